"""Training checkpoints that resume exactly: the model, the optimizer, the LR schedule, the step, the log so
far, and each rank's data position and random state, as of the end of one optimizer step.

Layout: `OUT/checkpoints/step_00000100/` holds `state.pt` (rank 0: everything replicated across ranks) and
`rank0.pt`, `rank1.pt`, ... (each rank's loader position and RNG states). A folder is written under a `.tmp`
name and renamed once every file is in it, so a crash mid-write leaves no folder that looks complete.
"""
from __future__ import annotations

import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .adapter import check_compatible
from .architectures import get_model_config, list_architectures, model_config_from_dict
from .checkpoint import EXPERT_MATRICES, upgrade_experts
from .config import RunConfig, from_dict
from .errors import ClipmoeError, first_line, write_failure
from .model import CLIP

FORMAT = "clipmoe-train/2"
# written before the experts' matrices became (E, width, hidden) (checkpoint.FORMAT): both were (E, hidden, width)
EXPERTS_TRANSPOSED = "clipmoe-train/1"
_PREFIX = "step_"


@dataclass
class Snapshot:
    """This rank's data position and random state after `step` optimizer steps."""

    step: int
    loader: dict
    rng: dict


def snapshot(step: int, loader) -> Snapshot:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return Snapshot(step, loader.state_dict(), rng)


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _all_ranks(ok: bool, world: int, group) -> bool:
    """Whether `ok` holds on every rank (also a barrier)."""
    if world == 1:
        return ok
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def save_checkpoint(out_dir: str | Path, snap: Snapshot, shared: dict, rank: int, world: int, keep: int,
                    extra: Optional[Callable[[Path], None]] = None, group=None) -> Optional[Path]:
    """Writes the checkpoint of `snap.step` (every rank calls this; `shared` matters on rank 0 only: model,
    optimizer, scheduler, history, ...); keeps the newest `keep` checkpoints. Returns the folder.
    `extra(folder)`, called on every rank, writes more into the folder before it is complete. The ranks agree in
    `group`, a gloo group (default: the default group), whose timeout must allow for rank 0's write of a large
    state.

    A write that fails on any rank (a full disk) leaves no folder, warns, and returns None: training goes on, and
    the newest complete checkpoint stays."""
    root = checkpoint_root(out_dir)
    final = root / f"{_PREFIX}{snap.step:08d}"
    tmp = root / (final.name + ".tmp")
    why = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"loader": snap.loader, "rng": snap.rng}, tmp / f"rank{rank}.pt")
        if extra is not None:
            extra(tmp)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer raises RuntimeError on a failed write
        why = f"rank {rank}: {write_failure(e, root)}"
    written = _all_ranks(why is None, world, group)
    if written and rank == 0:
        try:
            torch.save({"format": FORMAT, "step": snap.step, "world_size": world, **shared}, tmp / "state.pt")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except (OSError, RuntimeError) as e:
            why = write_failure(e, root)
    written = _all_ranks(written and why is None, world, group)
    if not written:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial files take the space a later write needs
            newest = complete_checkpoints(out_dir)
            warnings.warn(f"checkpoint {final} not written ({why or 'another rank failed to write its part'}); "
                          f"training goes on, and the newest complete checkpoint is "
                          f"{newest[-1] if newest else 'none'}", stacklevel=3)
        elif why is not None:
            warnings.warn(f"checkpoint {final} not written ({why})", stacklevel=3)
        return None
    if rank == 0:
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
             and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def check_out_dir(out_dir: str | Path, resume_from: Optional[Path], resume_spec: Optional[str]) -> None:
    """A run writes into a folder free of other runs' work (as open_clip refuses an existing experiment): their
    checkpoints would be pruned as if older than the new ones (or kept in their place), their model overwritten.
    A run that stopped before any checkpoint left no work: a new one may start over it. Continuing the folder's
    own run is what `train.resume` is for; `resume: latest` with no checkpoint there yet starts over, so that
    one command serves for the first launch and every restart."""
    out_dir = Path(out_dir)
    found = complete_checkpoints(out_dir)
    if found and (resume_from is None or resume_from.parent.resolve() != checkpoint_root(out_dir).resolve()):
        raise ClipmoeError(f"train.out_dir {out_dir} holds another run's checkpoints (up to {found[-1].name}): "
                           f"continue that run with train.resume: latest (--resume latest), or give another "
                           f"out_dir, or remove it")
    if resume_spec is None and (out_dir / "model.safetensors").is_file():  # a run that finished, without checkpoints
        raise ClipmoeError(f"train.out_dir {out_dir} holds a finished run (its model.safetensors): give another "
                           f"out_dir, or remove it, or set train.resume: latest to start over in it")


def resolve(spec: str, out_dir: str | Path) -> Optional[Path]:
    """The checkpoint folder `train.resume` names: "latest" (the newest in this run's output folder, None if it
    has none: a fresh start), a run folder (its newest), a checkpoint folder or its state.pt."""
    if spec == "latest":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(spec)
    if path.is_file() and path.name == "state.pt":
        path = path.parent
    if not path.exists():
        raise ClipmoeError(f"train.resume: {spec} not found")
    if (path / "state.pt").is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ClipmoeError(f"train.resume: {spec} holds no training checkpoint (give a run folder, a "
                           f"checkpoints/{_PREFIX}N folder, or 'latest')")
    return found[-1]


def _read(path: Path, what: str = "train.resume") -> dict:
    try:
        obj = _load(path)
    except FileNotFoundError:
        raise ClipmoeError(f"{what}: {path} is missing") from None
    except Exception as e:  # torch raises many types for a torn or foreign file; all mean "unreadable"
        why = first_line(e)
        raise ClipmoeError(f"{what}: {path} is not readable ({why})") from None
    if not isinstance(obj, dict):
        raise ClipmoeError(f"{what}: {path} is not a clipmoe training checkpoint")
    return obj


def _load(path: Path):
    """Memory-mapped: the ranks of a node share one copy of the state in the page cache, instead of each holding
    the whole model and optimizer state in its own memory at once; read plainly where the file system cannot map."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception:  # no mmap on this file system, or an unreadable file: the plain read says which
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_shared(folder: Path, what: str = "train.resume") -> dict:
    shared = _read(folder / "state.pt", what)
    if shared.get("format") not in (FORMAT, EXPERTS_TRANSPOSED):
        raise ClipmoeError(f"{what}: {folder / 'state.pt'} is not a clipmoe training checkpoint "
                           f"(format {shared.get('format')!r})")
    if shared["format"] == EXPERTS_TRANSPOSED:  # the optimizer's state is upgraded by `optimizer_state`
        shared["model"] = upgrade_experts(shared["model"], "clipmoe/2")
    return shared


def optimizer_state(shared: dict, key: str, opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The optimizer state `shared[key]` of a checkpoint for `opt`, which optimizes `model`'s parameters: with the
    experts' state tensors (AdamW's moments) in today's layout where the checkpoint has the earlier one."""
    state = shared[key]
    if shared["format"] != EXPERTS_TRANSPOSED:
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]  # the state's indices, in order
    out = {**state, "state": dict(state["state"])}
    for i, p in enumerate(params):
        if i in out["state"] and names.get(id(p), "").endswith(EXPERT_MATRICES):
            out["state"][i] = {k: v.transpose(-2, -1).contiguous() if torch.is_tensor(v) and v.ndim == 3 else v
                               for k, v in out["state"][i].items()}
    return out


def load_model(path: str | Path) -> CLIP:
    """The model of a training checkpoint (a `checkpoints/step_N` folder or its state.pt), in eval mode on the CPU:
    to evaluate or embed with a run's intermediate weights. Read with `torch.load(weights_only=True)`."""
    path = Path(path)
    folder = path.parent if path.name == "state.pt" else path
    shared = _read_shared(folder, "training checkpoint")
    if "model_config" in shared:
        cfg = model_config_from_dict(shared["model_config"])
    else:  # written before checkpoints held the model's config: the run config's model section
        section = from_dict(RunConfig, shared["config"]).model
        if section.arch not in list_architectures():
            raise ClipmoeError(f"{folder}: this checkpoint does not record its model's architecture; use the "
                               "model its run writes (model.safetensors)")
        cfg = get_model_config(section.arch, section.overrides or None)
    model = CLIP(cfg)
    check_compatible(model, shared["model"], str(folder))
    model.load_state_dict(shared["model"])
    return model.eval()


def load_checkpoint(folder: Path, rank: int) -> tuple[dict, Optional[dict]]:
    """(shared state, this rank's state) of a checkpoint folder; the latter None where the ranks that wrote it were
    fewer than `rank + 1`."""
    shared = _read_shared(folder)
    return shared, _read(folder / f"rank{rank}.pt") if rank < shared["world_size"] else None


def fresh_data_epoch(folder: Path, world_size: int) -> int:
    """The first epoch that no rank of a checkpoint had begun to read (its ranks may be an epoch apart): where a
    run that cannot take up the saved data positions (another number of ranks or workers) continues the data."""
    def after(loader: dict) -> int:
        return loader["epoch"] + any(p["items"] for p in loader["workers"].values())
    return max(after(_read(folder / f"rank{r}.pt")["loader"]) for r in range(world_size))


def restore_model(model: torch.nn.Module, shared: dict, folder: Path) -> None:
    check_compatible(model, shared["model"], f"train.resume: {folder}")
    model.load_state_dict(shared["model"])
