"""clipmoe: CLIP-style contrastive image-text pretraining with sparse Mixture-of-Experts.

The names below load their module on first use (PEP 562), so that `import clipmoe` and `clipmoe --help`
do not pay for torch, open_clip and torchvision (about 8 s on 2 cores) before anything needs them.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .errors import ClipmoeError as ClipmoeError  # light: no torch
from .errors import ConfigError as ConfigError

__version__ = "0.1.0"

_LAZY = {
    ".analysis": ["analyze_routing"],
    ".architectures": ["get_model_config", "list_architectures", "list_pretrained"],
    ".checkpoint": ["load", "save", "save_open_clip"],
    ".config": ["ModelConfig", "MoEConfig", "RunConfig", "TextConfig", "VisionConfig", "load_run_config"],
    ".encode": ["encode_image", "encode_text"],
    ".factory": ["create_model", "create_model_and_transforms", "create_transforms", "get_tokenizer"],
    ".model": ["CLIP", "CLIPOutput"],
    ".moe": ["MoE", "MoEAux", "moe_report"],
    ".upcycle": ["upcycle"],
    ".validation": ["validate"],
    ".zeroshot_eval": ["zeroshot_eval"],
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(["ClipmoeError", "ConfigError", *_MODULE_OF])


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'clipmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `clipmoe.upcycle` and `clipmoe.zeroshot_eval` the functions: loading a submodule sets the package
    attribute of its name to the module, which would hide the function of the same name."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _MODULE_OF:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from .analysis import analyze_routing  # noqa: F401
    from .architectures import get_model_config, list_architectures, list_pretrained  # noqa: F401
    from .checkpoint import load, save, save_open_clip  # noqa: F401
    from .config import ModelConfig, MoEConfig, RunConfig, TextConfig, VisionConfig, load_run_config  # noqa: F401
    from .encode import encode_image, encode_text  # noqa: F401
    from .factory import create_model, create_model_and_transforms, create_transforms, get_tokenizer  # noqa: F401
    from .model import CLIP, CLIPOutput  # noqa: F401
    from .moe import MoE, MoEAux, moe_report  # noqa: F401
    from .upcycle import upcycle  # noqa: F401
    from .validation import validate  # noqa: F401
    from .zeroshot_eval import zeroshot_eval  # noqa: F401
