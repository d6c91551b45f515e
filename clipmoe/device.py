"""`resolve_device`: a device named in a config, a flag or an argument, checked against this machine."""
from __future__ import annotations

from typing import Union

import torch

from .errors import ClipmoeError

DeviceRef = Union[str, torch.device, None]


def resolve_device(name: DeviceRef = None) -> torch.device:
    """None or "auto": cuda if available, else cpu. Anything else as torch.device takes it ("cpu", "cuda:1"),
    with a one-line error for a malformed name or a device this machine lacks, instead of torch's error from
    deep inside the first `.to()`."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ClipmoeError(f"unknown device {name!r} (e.g. 'auto', 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ClipmoeError(f"device {name!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ClipmoeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ClipmoeError(f"device {name!r}: MPS is not available on this machine")
    return dev


def check_model_device(model: torch.nn.Module, name: DeviceRef) -> None:
    """A model object is used where it is, never moved behind the caller's back: a `device` that names
    another place is an error, not silently ignored."""
    if name is None or name == "auto":
        return
    want, have = resolve_device(name), next(model.parameters()).device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ClipmoeError(f"device={str(name)!r}, but the model given is on {have}: pass a model path to load it "
                           f"there, or move the model first (model.to({str(name)!r}))")
