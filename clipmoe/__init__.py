"""clipmoe: CLIP-style contrastive image-text pretraining with sparse Mixture-of-Experts."""
from .architectures import get_model_config, list_architectures
from .checkpoint import load, save
from .config import ModelConfig, MoEConfig, RunConfig, TextConfig, VisionConfig, load_run_config
from .errors import ClipmoeError, ConfigError
from .factory import create_model, create_model_and_transforms, create_transforms, get_tokenizer
from .model import CLIP, CLIPOutput
from .moe import MoEAux
from .upcycle import upcycle

__version__ = "0.1.0"
