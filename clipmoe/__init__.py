"""clipmoe: CLIP-style contrastive image-text pretraining with sparse Mixture-of-Experts."""
from .architectures import get_model_config, list_architectures
from .checkpoint import load, save, save_open_clip
from .config import ModelConfig, MoEConfig, RunConfig, TextConfig, VisionConfig, load_run_config
from .encode import encode_image, encode_text
from .errors import ClipmoeError, ConfigError
from .factory import create_model, create_model_and_transforms, create_transforms, get_tokenizer
from .model import CLIP, CLIPOutput
from .moe import MoEAux, moe_report
from .upcycle import upcycle
from .zeroshot_eval import zeroshot_eval

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CLIPOutput", "ClipmoeError", "ConfigError", "ModelConfig", "MoEAux", "MoEConfig", "RunConfig",
    "TextConfig", "VisionConfig", "create_model", "create_model_and_transforms", "create_transforms",
    "encode_image", "encode_text", "get_model_config", "get_tokenizer", "list_architectures", "load",
    "load_run_config", "moe_report", "save", "save_open_clip", "upcycle", "zeroshot_eval",
]
