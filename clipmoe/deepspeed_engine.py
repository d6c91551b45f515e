"""Training under DeepSpeed's engine (`train.deepspeed`: a DeepSpeed config, e.g. `{zero_optimization: {stage: 2}}`):
ZeRO stages 0-2 partition the optimizer state (1) and the gradients (2) over the ranks.

clipmoe's config stays the one source of what it already decides: the batch size per rank, the optimizer
(AdamW with clipmoe's parameter groups and LR schedule, handed to the engine), gradient clipping and precision
(`train.precision: bf16` is autocast with fp32 weights, which keeps the router in fp32; DeepSpeed's bf16 mode
would cast the router's weights too). A DeepSpeed config that says otherwise is one error naming the key.
Launch with `deepspeed` or `torchrun`; both set the environment `clipmoe train` reads.

With expert parallelism (`train.expert_parallel_size`, ZeRO 1-2) the engine holds the rest of the model and
clipmoe the experts' shards: their gradients are reduced over the ranks holding the same experts
(`expert_parallel.reduce_expert_grads`), their AdamW steps beside the engine's with the same schedule, and the
engine's clipping norm counts them (see `initialize`).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import os
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_

from . import expert_parallel as ep
from .config import RunConfig
from .errors import ClipmoeError, first_line
from .resume import EXPERTS_TRANSPOSED

TAG = "deepspeed"  # the engine's folder inside a clipmoe training checkpoint


def engine_config(cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed config for `cfg`: `cfg.train.deepspeed`, with what clipmoe's config decides filled in."""
    ds = copy.deepcopy(cfg.train.deepspeed)

    def fixed(key: str, ours, why: str) -> None:
        if key in ds and ds[key] != ours:
            raise ClipmoeError(f"train.deepspeed.{key}: {ds[key]!r}, but {why} makes it {ours!r}; leave it out")
        ds[key] = ours

    batch = cfg.data.batch_size
    fixed("train_micro_batch_size_per_gpu", batch, f"data.batch_size ({batch} per rank)")
    fixed("gradient_accumulation_steps", 1, "clipmoe's training loop (one batch per step)")
    fixed("train_batch_size", batch * world, f"data.batch_size x {world} ranks")
    for key in ("bf16", "fp16", "torch_autocast", "amp"):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            raise ClipmoeError(f"train.deepspeed.{key}: set train.precision: bf16 instead (autocast with fp32 "
                               "weights: the router and the auxiliary losses stay fp32)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ClipmoeError(f"train.deepspeed.{key}: clipmoe builds AdamW and its schedule from the optim: "
                               "section (lr, warmup_steps, weight_decay, betas); set them there")
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ClipmoeError(f"train.deepspeed.zero_optimization: expected a section, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise ClipmoeError(f"train.deepspeed.zero_optimization.stage: {stage!r}; clipmoe supports ZeRO stages 0, 1 "
                           "and 2 (stage 3 partitions the parameters, which the MoE layers read whole)")
    if cfg.train.expert_parallel_size > 1 and stage == 0:
        raise ClipmoeError("train.expert_parallel_size under train.deepspeed needs zero_optimization.stage 1 or 2 "
                           "(without ZeRO, leave out train.deepspeed: plain DDP trains the same way)")
    clip = float(cfg.optim.grad_clip or 0.0)
    fixed("gradient_clipping", clip, "optim.grad_clip")
    if stage == 0:  # DeepSpeed 0.19 cannot clip 0-dim gradients (the logit scale's) without ZeRO: clipmoe clips
        ds["gradient_clipping"] = 0.0
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW under ZeRO
    ds.setdefault("steps_per_print", 2**31 - 1)  # clipmoe logs the steps itself
    return ds


def check_config(cfg: RunConfig, world: int) -> None:
    """`cfg.train.deepspeed` checked before any work: against clipmoe's config (`engine_config`), by DeepSpeed's
    own config reader, and for top-level keys DeepSpeed does not know. DeepSpeed ignores those, so a misspelt
    `zero_optimizaton` would train without ZeRO: a key close to one it knows is an error, another a warning."""
    ds = engine_config(cfg, world)
    try:
        import deepspeed
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as e:
        raise ClipmoeError(f"train.deepspeed needs DeepSpeed (pip install deepspeed): {e}") from None
    # its batch-size check reads the world size from a process group DeepSpeed may not have joined yet: it
    # computes the same train_batch_size itself
    probe = _AskedKeys({k: v for k, v in ds.items() if k != "train_batch_size"})
    try:
        with _quiet(deepspeed.utils.logger):  # it logs its whole config at INFO; the engine logs it again
            DeepSpeedConfig(probe)
    except Exception as e:
        raise ClipmoeError(f"train.deepspeed: DeepSpeed's engine refused it: {_reason(e)}") from e
    version = deepspeed.__version__
    for key in (k for k in ds if k not in probe.asked and k != "train_batch_size"):
        close = difflib.get_close_matches(key, sorted(probe.asked), n=1, cutoff=0.8)
        if close:
            raise ClipmoeError(f"train.deepspeed.{key}: DeepSpeed {version} has no such key; did you mean "
                               f"{close[0]!r}? (it would ignore it)")
        warnings.warn(f"train.deepspeed.{key}: DeepSpeed {version} does not read this key; it is ignored",
                      stacklevel=2)


class _AskedKeys(dict):
    """A config dict that records every key its reader asks for, there or not (DeepSpeed asks for each key it
    knows, with a default); its copies record into the same set."""

    def __init__(self, data, asked: set | None = None):
        super().__init__(data)
        self.asked = set() if asked is None else asked

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def __copy__(self):
        return _AskedKeys(self, self.asked)

    def __deepcopy__(self, memo):
        return _AskedKeys(copy.deepcopy(dict(self), memo), self.asked)


def quiet_step_warnings(scope: contextlib.ExitStack) -> None:
    """Until `scope` closes, hides the deprecation warnings of torch functions that DeepSpeed's step calls (under
    ZeRO, `all_gather_into_tensor`): nothing a clipmoe user can change, repeated at every step by every rank
    (torch's filters, reset at each step, let each through again)."""
    scope.enter_context(warnings.catch_warnings())
    # torch attributes them to its own wrapper (torch.distributed.c10d_logger), not to DeepSpeed: by message
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed's engine needs a process group, also on one process: a one-rank group on a free local port."""
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ClipmoeError("train.deepspeed: the launcher's process group was not joined")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # what a launcher would set:
        os.environ.setdefault(key, value)  # DeepSpeed's engine asserts LOCAL_RANK


def initialize(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, cfg: RunConfig, world: int):
    """The DeepSpeed engine around `model`, stepping `opt` and `sched`. Every rank must already hold the same
    weights (rank 0's: `expert_parallel.broadcast_model`, before the experts are sharded). Under expert
    parallelism `opt` holds all but the experts' shards, and the ZeRO optimizer's norm for clipping includes the
    experts' gradients, which it clips too."""
    try:
        import deepspeed
    except ImportError as e:
        raise ClipmoeError(f"train.deepspeed needs DeepSpeed (pip install deepspeed): {e}") from None
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    # the engine's start-up broadcast is skipped (it skips weights marked `ds_optim_param`, an attribute read
    # nowhere else unless offloading is configured): it would overwrite the other ranks' expert shards, and
    # DeepSpeed 0.19's views every weight as bytes, which fails on 0-dim ones (open_clip's logit scale and bias)
    params = list(model.parameters())
    for p in params:
        p.ds_optim_param = True
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                          config=engine_config(cfg, world), dist_init_required=False)
    except Exception as e:  # mostly its config's validation (pydantic) and its checks of the combination
        raise ClipmoeError(f"train.deepspeed: DeepSpeed's engine refused it: {_reason(e)}") from e
    finally:
        for p in params:
            del p.ds_optim_param
    if ep.is_sharded(model):
        _count_experts_in_zero_norm(engine.optimizer, model, float(cfg.optim.grad_clip or 0.0))
    return engine


def _reason(e: Exception) -> str:
    """One line for an exception from `deepspeed.initialize`; for a validation error of its config, the key."""
    from pydantic import ValidationError  # DeepSpeed's config classes are pydantic models

    if isinstance(e, ValidationError) and e.errors():
        first = e.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']} ({getattr(e, 'title', 'config')})"
    return f"{type(e).__name__}: {first_line(e, limit=400)}"


def _count_experts_in_zero_norm(zero, model: torch.nn.Module, max_norm: float) -> None:
    """ZeRO's gradient norm (of the weights it holds) made the whole model's, the experts' shards included, and
    those clipped by it too: one clipping for the whole model, as without DeepSpeed. ZeRO 1-2 take their norm
    from `scaled_global_norm` in their step."""
    own_norm = zero.scaled_global_norm

    def scaled_global_norm(norm_type=2):
        norm = own_norm(norm_type)
        if norm.item() < 0:  # DeepSpeed's mark of an inf/NaN gradient: the step is skipped
            return norm
        experts = ep.expert_grad_norm(model).to(norm)
        total = (norm.square() + experts.square()).sqrt()
        if max_norm:
            clip_grads_with_norm_(ep.expert_parameters(model), max_norm, total)
        return total

    zero.scaled_global_norm = scaled_global_norm


def clip_grad_norm_(engine, model: torch.nn.Module, max_norm: float) -> None:
    """Between the engine's backward (which averaged the gradients) and its step: clips where the engine does not
    (without ZeRO; see `engine_config`)."""
    if max_norm and not engine.zero_optimization():
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """open_clip's clamp of the logit scale to [0, ln 100], on the weight and, under ZeRO 1-2, on the optimizer's
    fp32 copy (the weight is overwritten from it at the next step)."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        value = model.logit_scale.clamp(0, math.log(100))
        safe_set_full_fp32_param(model.logit_scale, value)
        model.logit_scale.copy_(value)


def save(engine, folder: Path) -> None:
    """The engine's state (optimizer partitions of every rank, the schedule) into a checkpoint folder (every rank
    calls this)."""
    # the weights are in clipmoe's part of the checkpoint, whole (`load` restores them from there): the engine's
    # copy is left out, as DeepSpeed's pipeline engine leaves it out (its module_state_dict returns None)
    engine.module_state_dict = lambda *args, **kwargs: None
    try:
        engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)
    finally:
        del engine.module_state_dict  # the class's again


def check_resumable(folder: Path, shared: dict, under_deepspeed: bool, expert_parallel: bool = False,
                    world: int | None = None) -> None:
    """A checkpoint resumes under DeepSpeed only if written under it (the optimizer state is the engine's), and
    the other way round; under DeepSpeed, with expert parallelism only if written with it (the engine's state
    then leaves out the experts), and on as many ranks as wrote it (`world`; the engine does not re-partition its
    optimizer state): one error before any work."""
    if under_deepspeed and not (folder / TAG).is_dir():
        raise ClipmoeError(f"train.resume: {folder} holds no DeepSpeed state ({folder / TAG}); it was written "
                           "without train.deepspeed")
    if under_deepspeed and world is not None and shared["world_size"] != world:
        raise ClipmoeError(f"train.resume: {folder} was written under train.deepspeed by {shared['world_size']} "
                           f"ranks and this run has {world}; DeepSpeed's optimizer state is per rank, so resume "
                           f"with {shared['world_size']}")
    if not under_deepspeed and shared.get("optimizer") is None:
        raise ClipmoeError(f"train.resume: {folder} was written under train.deepspeed (its optimizer state is "
                           "DeepSpeed's); resume with train.deepspeed")
    if under_deepspeed and shared.get("format") == EXPERTS_TRANSPOSED:
        raise ClipmoeError(f"train.resume: {folder} was written by an earlier clipmoe, which stored the experts' "
                           "matrices as (E, hidden, width); DeepSpeed's optimizer state holds them so and cannot be "
                           "converted: resume it with the clipmoe that wrote it, or train on from its model "
                           f"(clipmoe.resume.load_model({str(folder)!r}))")
    written_with = shared.get("expert_optimizer") is not None
    if under_deepspeed and written_with != expert_parallel:
        raise ClipmoeError(f"train.resume: {folder} was written under train.deepspeed "
                           f"{'with' if written_with else 'without'} expert parallelism (the engine's optimizer "
                           f"state {'leaves out' if written_with else 'holds'} the experts); resume "
                           f"{'with' if written_with else 'without'} train.expert_parallel_size > 1")


def load(engine, folder: Path) -> None:
    """The engine's state from a checkpoint folder `save` wrote into (see `check_resumable`). The weights are
    clipmoe's, restored from the checkpoint's whole model, not from the engine's copy (one rank's expert shards)."""
    try:
        engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                               custom_load_fn=lambda src, dst: None)
    except Exception as e:  # a missing, torn or foreign file: DeepSpeed and torch raise many types
        why = first_line(e)
        raise ClipmoeError(f"train.resume: DeepSpeed's state in {folder / TAG} is not readable ({why})") from None
