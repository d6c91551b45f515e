"""Reading and writing weights: clipmoe's safetensors files (weights + config, never pickle) and
open_clip / OpenAI checkpoints (.safetensors, .bin, .pt, .pth; TorchScript archives from OpenAI)."""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import adapter
from .architectures import config_from_weights, model_config_from_dict
from .config import ModelConfig, to_dict
from .errors import ClipmoeError
from .model import CLIP

FORMAT = "clipmoe/3"  # experts.w1 and experts.w2 both (E, width, hidden)
# the expert matrices that earlier formats stored transposed, as (E, hidden, width): read into today's layout
EXPERT_MATRICES = (".experts.w1", ".experts.w2")  # state-dict key suffixes of the experts' weight matrices
_TRANSPOSED = {"clipmoe/1": (".experts.w2",), "clipmoe/2": EXPERT_MATRICES}


def upgrade_experts(state: dict, fmt: str) -> dict:
    """A state dict written in format `fmt` (clipmoe/1 or /2) in today's layout of the expert matrices."""
    ends = _TRANSPOSED.get(fmt, ())
    return {k: v.transpose(-2, -1) if k.endswith(ends) else v for k, v in state.items()}


def save(model: CLIP, path: str | Path) -> Path:
    """Writes `model`'s weights and config to one safetensors file (loadable with `clipmoe.load`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(to_dict(model.config))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a crash mid-write never leaves a half file under the final name
    return path


def save_open_clip(model: CLIP, path: str | Path) -> Path:
    """Writes a dense model as an open_clip checkpoint (`open_clip.create_model(arch, pretrained=path)`
    loads it): safetensors for a `.safetensors` path, else a plain `torch.save` state dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.to_open_clip(model.state_dict()).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def read_safetensors(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with a one-line error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ClipmoeError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ClipmoeError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    return tensors, meta


def _config_from_metadata(path, meta: dict) -> ModelConfig:
    if meta.get("format") not in (FORMAT, *_TRANSPOSED) or "config" not in meta:
        raise ClipmoeError(f"{path}: not a clipmoe checkpoint (no clipmoe config in its metadata); "
                           "open_clip weights load with clipmoe.create_model(ARCH, pretrained=PATH)")
    try:
        return model_config_from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, ClipmoeError) as e:
        raise ClipmoeError(f"{path}: broken config in metadata ({_first_line(e)})") from None


def read_metadata(path: str | Path) -> dict:
    """The metadata of a safetensors file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ClipmoeError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a clipmoe checkpoint, without reading its tensors."""
    return _config_from_metadata(path, read_metadata(path))


def is_clipmoe_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file `clipmoe.save` wrote (else: open_clip weights, or unreadable)."""
    return Path(path).suffix == ".safetensors" and read_metadata(path).get("format") in (FORMAT, *_TRANSPOSED)


MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def open_clip_weights_error(path: Path) -> ClipmoeError:
    """The error for a checkpoint other than a clipmoe model file where one belongs: for open_clip weights, the
    call that loads them, with the architecture their shapes give."""
    try:
        arch = config_from_weights(read_checkpoint(path)).name or "ARCH"
    except ClipmoeError as e:
        return ClipmoeError(e if str(e).startswith(str(path)) else f"{path}: {e}")
    return ClipmoeError(f"{path} holds open_clip weights, which do not name their architecture: "
                        f"clipmoe.create_model({arch!r}, pretrained={str(path)!r}), "
                        f"or --model {arch} --pretrained {path}")


def not_a_model_file(path: Path) -> ClipmoeError:
    """The error for a folder given where a model file belongs; for a training checkpoint, the call that reads its
    model (the CLI's commands read them themselves)."""
    if (path / "state.pt").is_file():
        return ClipmoeError(f"{path} is a training checkpoint, not a model file: its model is "
                            f"clipmoe.resume.load_model({str(path)!r})")
    files = sorted(str(f) for f in path.iterdir() if f.suffix in MODEL_SUFFIXES and f.is_file())
    if files:
        return ClipmoeError(f"{path} is a folder; give the model file in it: {', '.join(files[:4])}")
    # a run folder mid-run (no model.safetensors yet), or its checkpoints/ folder
    steps = sorted(path.glob("step_*/state.pt")) or sorted(path.glob("checkpoints/step_*/state.pt"))
    if steps:
        return ClipmoeError(f"{path} is a folder of training checkpoints; give one of them (the newest: "
                            f"{steps[-1].parent})")
    return ClipmoeError(f"{path} is a folder with no model file in it")


def load(path: str | Path, device: str | torch.device = "cpu") -> CLIP:
    """Reads a model written by `clipmoe.save`; never unpickles anything."""
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise open_clip_weights_error(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") not in (FORMAT, *_TRANSPOSED) and adapter.is_open_clip_state_dict(tensors):
        raise open_clip_weights_error(path)
    model = CLIP(_config_from_metadata(path, meta))
    load_weights(model, upgrade_experts(tensors, meta["format"]), str(path))
    return model.to(device).eval()


def load_weights(model: CLIP, state_dict: dict, source: str) -> None:
    """Loads a clipmoe or open_clip state dict into `model`, with one-line errors on mismatch."""
    if adapter.is_open_clip_state_dict(state_dict):
        state_dict = adapter.from_open_clip(state_dict)
    for key in ("logit_scale", "logit_bias"):  # OpenAI's archives hold the scale as (1,)
        if key in state_dict and getattr(model, key) is not None:
            state_dict[key] = state_dict[key].reshape(getattr(model, key).shape)
    if model.logit_bias is not None and "logit_bias" not in state_dict:
        # CLIP weights for a model with SigLIP's bias (fine-tuning with the sigmoid loss): the bias starts at
        # the config's init_logit_bias, as open_clip's --siglip does
        state_dict = {**state_dict, "logit_bias": model.logit_bias.detach().clone()}
    adapter.check_compatible(model, state_dict, source)
    model.load_state_dict(state_dict)


def read_checkpoint(path: str | Path) -> dict:
    """A state dict from any checkpoint file, without executing code from it.

    .safetensors through safetensors; everything else with `torch.load(weights_only=True)`, except
    OpenAI's TorchScript archives, whose tensors are read with `torch.jit.load`.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipmoeError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        return upgrade_experts(tensors, meta.get("format", ""))
    if is_torchscript(path):
        return _read_torchscript(path)
    if not _is_torch_save(path):  # torch.load's own error for these is a bare KeyError of the first byte
        raise ClipmoeError(f"{path}: not a checkpoint (neither safetensors nor a torch.save zip or pickle file)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "unreadable"
        raise ClipmoeError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipmoeError(f"{path}: holds no state dict of tensors")
    return obj


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_torch_save(path: Path) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, or (the legacy format) a pickle of protocol 2+.
    A truncated one still does (torch.load then says what is wrong with it)."""
    with path.open("rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _read_torchscript(path: Path) -> dict:
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript, in which OpenAI's checkpoints stay
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        raise ClipmoeError(f"{path}: not a readable TorchScript checkpoint ({_first_line(e)})") from None
    return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def _first_line(e: BaseException) -> str:
    """What went wrong, in one short line: the first sentence of the error's first line."""
    if isinstance(e, EOFError):
        return "the file ends early: truncated?"
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0]
    return (line.split(". ")[0] if len(line) > 120 else line)[:200]
