"""The training loop: data, model, AdamW with warmup + cosine, optional bf16 autocast and DDP (torchrun).

`train(cfg)` is what `clipmoe train` calls. It knows the loader only through `loaders.image_text_loader`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import chain, count
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import loaders
from loaders.transforms import TrainTransform, normalize_batch

from . import cuda_graphs, deepspeed_engine, resume
from . import expert_parallel as ep
from .accumulation import accumulated_backward
from .architectures import canonical_name, get_model_config, list_architectures
from .checkpoint import save
from .config import ModelSection, OptimConfig, RunConfig, as_run_config, deep_merge, to_dict
from .device import resolve_device
from .errors import ClipmoeError, make_folder, write_failure
from .factory import MEAN, STD, create_model, get_tokenizer
from .loss import SIGMOID_NEEDS_BIAS, total_loss
from .model import CLIP
from .moe import MoE, moe_report
from .plots import plot_expert_load, plot_losses, plot_moe_history, plot_zeroshot
from .progress import bar_intervals
from .stopping import StopNow, StopVote, Terminated
from .validation import validate
from .zeroshot_eval import check_datasets, zeroshot_eval


@dataclass
class TrainResult:
    model: CLIP
    history: list[dict]  # one row per logged step: step, lr, every loss term and "moe" (moe_report)
    expert_load: dict[str, list[float]]  # "image.3" -> fraction of assignments per expert, whole run
    data_stats: dict
    out_dir: Path
    files: dict = field(default_factory=dict)
    zeroshot: list[dict] = field(default_factory=list)  # {"step", "results"} per evaluation (rank 0)
    validation: list[dict] = field(default_factory=list)  # {"step", **validate's metrics} per run on data.eval
    cuda_graphs: dict = field(default_factory=dict)  # "image.3" -> steps that layer ran as CUDA graphs
    steps: int = 0  # optimizer steps taken: train.steps, or fewer after Ctrl-C


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, see `Terminated`) during `train`, raised after the steps done were written out (model,
    log, plots; rank 0): `result` is that shorter run, `signum` the signal that stopped it."""

    def __init__(self, result: TrainResult, total: int, signum: int = signal.SIGINT):
        how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        super().__init__(f"{how} {_kept(result, total)}")
        self.result, self.signum = result, signum


def _kept(result: TrainResult, total: int) -> str:
    """What a run stopped early wrote out: "after 40 of 500 steps; its model: ...; to continue: --resume ..."."""
    where = f"; its model: {result.files['model']}" if "model" in result.files else ""
    if result.files.get("checkpoint"):
        where += f"; to continue: --resume {result.files['checkpoint']}"
    return f"after {result.steps} of {total} steps{where}"


def cpu_bf16_matmul_is_slow() -> bool:
    """Whether torch's bf16 matmuls on this CPU take its slow fallback: oneDNN's bf16 kernels need AVX-512 (or
    AMX). On a 2-core AVX2 EPYC a bf16 product ran at 0.5 GFLOP/s against 92 in fp32, and a quickstart
    training step under bf16 autocast took 8-10x as long as in fp32."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without the query: assume the fast kernels
        return False


def local_device(device: torch.device, local_rank: Optional[str], gpus: int) -> torch.device:
    """The device of this process: under a launcher (LOCAL_RANK set), a bare "cuda" is GPU LOCAL_RANK of this
    machine, as in open_clip (else every rank of a node would share GPU 0)."""
    if device.type != "cuda" or device.index is not None or local_rank is None:
        return device
    index = int(local_rank)
    if index >= gpus:
        raise ClipmoeError(f"LOCAL_RANK {index}, but this machine has {gpus} GPU(s): start at most {gpus} processes "
                           "per node (torchrun --nproc_per_node)")
    return torch.device("cuda", index)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _waiting_group(minutes: float):
    """A gloo group, with a timeout of its own, for the other ranks to wait in while rank 0 works alone (evaluates,
    writes a checkpoint). Waiting in the next collectives of training instead (the stop vote's gloo all-reduce, a
    barrier), they would meet those groups' timeouts (torch's defaults: 30 minutes for gloo, 10 for NCCL) in any
    longer zero-shot evaluation or checkpoint write, and the run would end. Every rank makes it, in the same order
    as its other groups."""
    return dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, steps: int, only: Optional[Callable[[str], bool]] = None):
    """AdamW without weight decay on gains, biases and the logit scale (as open_clip), over the parameters whose
    names `only` accepts (default: all)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and (only is None or only(name)):
            # expert biases are stacked (E, F): 2-D, but biases all the same
            (no_decay if p.ndim < 2 or name.endswith((".b1", ".b2")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)

    def schedule(step: int) -> float:  # the factor on optim.lr at `step`, as open_clip's schedulers compute it
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        cooldown_start = steps - cfg.cooldown_steps
        if cfg.schedule == "const" or step < cooldown_start:
            return 1.0
        decay = (1 - min(1.0, (step - cooldown_start) / cfg.cooldown_steps)) ** cfg.cooldown_power
        end = cfg.cooldown_end_lr / cfg.lr
        return decay * (1 - end) + end

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _batches(loader: loaders.ImageTextLoader, resuming: bool = False):
    """Endless batches, epoch after epoch (each epoch a new seeded shuffle), from the loader's epoch on. A resumed
    pass may have nothing left (a checkpoint at the end of an epoch): then the next epoch follows."""
    for epoch in count(loader.epoch):
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty and not resuming:
            stats = loader.stats()
            hint = "; data.strict: true stops at the first one and says what it was" if stats["skipped"] else ""
            raise ClipmoeError(f"the training data yielded no samples in epoch {epoch}: {stats}{hint}")
        resuming = False


def train(cfg: RunConfig | str | Path | dict, model: Optional[CLIP] = None, progress: bool = True) -> TrainResult:
    """Trains `model` (or the one `cfg.model` names) on `cfg.data.train` for `cfg.train.steps` steps. `cfg`: a
    RunConfig, a YAML file as `clipmoe train` takes it, or a dict in the YAML's layout.

    Ctrl-C or SIGTERM writes out the steps done as a shorter run (with a checkpoint where `train.save_every` is set)
    and raises `TrainingInterrupted` (a KeyboardInterrupt) holding it. On several processes the ranks stop together
    at the next step's start (`stopping.StopVote`), also when one rank's data fails."""
    cfg = as_run_config(cfg)
    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cuda":
        device = local_device(device, os.environ.get("LOCAL_RANK"), torch.cuda.device_count())
        if device.index is not None:  # NCCL and kernels without an explicit device take the current one
            torch.cuda.set_device(device)
    rank, world = _distributed(device)
    if tc.deepspeed is not None:
        deepspeed_engine.check_config(cfg, world)  # a DeepSpeed config that contradicts clipmoe's: an error now
    if cfg.eval.zeroshot:  # as a benchmark that cannot be opened: not a failed evaluation after the training
        try:
            check_datasets(cfg.eval.zeroshot, cfg.eval.data_root)
        except ClipmoeError as e:
            raise ClipmoeError(f"eval.zeroshot: {e}") from None
    if not cfg.data.train:
        raise ClipmoeError("data.train: no training shards given")
    try:  # a spec that cannot feed this loader: said before the model is built
        loaders.check_sources(cfg.data.train, resampled=cfg.data.resampled,
                              samples_per_epoch=cfg.data.samples_per_epoch, world_size=world,
                              num_workers=cfg.data.num_workers)
    except loaders.DataError as e:
        raise ClipmoeError(f"data.train: {e}") from None
    if cfg.data.eval:  # held-out shards that do not exist: said now, not after the training
        try:
            loaders.expand_shards(cfg.data.eval)
        except ValueError as e:
            raise ClipmoeError(f"data.eval: {e}") from None
    out_dir = make_folder(tc.out_dir, "train.out_dir")  # before any work: a run that cannot write should not start
    resume_from = resume.resolve(tc.resume, tc.out_dir) if tc.resume else None
    resume.check_out_dir(out_dir, resume_from, tc.resume)
    torch.manual_seed(tc.seed + rank)
    random.seed(tc.seed + rank)
    if tc.precision == "bf16" and device.type == "cpu" and cpu_bf16_matmul_is_slow():
        warnings.warn("train.precision bf16 on a CPU without bf16 matmul kernels (AVX-512 or AMX): torch runs "
                      "bf16 products many times slower than fp32 here; precision fp32 trains faster", stacklevel=2)
    if model is None:
        model = create_model(_with_logit_bias(cfg.model) if cfg.loss.kind == "sigmoid" else cfg.model)
    model = model.to(device).train()
    if cfg.loss.kind == "sigmoid" and model.logit_bias is None:
        raise ClipmoeError(SIGMOID_NEEDS_BIAS)
    if resume_from is not None:
        shared, mine = resume.load_checkpoint(resume_from, rank)
        if shared["step"] > tc.steps:  # there is no going back from it
            raise ClipmoeError(f"train.resume: {resume_from} is at step {shared['step']}, past train.steps "
                               f"({tc.steps}); raise train.steps to train on from it")
        deepspeed_engine.check_resumable(resume_from, shared, tc.deepspeed is not None,
                                         tc.expert_parallel_size > 1, world)
        resume.restore_model(model, shared, resume_from)
    if tc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if tc.lock_image:
        model.lock_image_tower(tc.lock_image_unlocked_groups)
    if tc.lock_text:
        model.lock_text_tower(tc.lock_text_unlocked_layers)
    groups = ep.new_groups(tc.expert_parallel_size) if tc.expert_parallel_size > 1 else None
    if groups is not None or (tc.deepspeed is not None and world > 1):
        ep.broadcast_model(model)  # every rank starts from rank 0's model (DDP does this itself)
    if groups is not None:  # each rank keeps its share of the experts
        ep.shard_experts(model, groups)
    # the workers' fast path: uint8 crops, normalised below on the device (open_clip's train transform)
    train_tf = TrainTransform(model.config.vision.image_size, scale=cfg.data.crop_scale, mean=MEAN, std=STD)
    loader = loaders.image_text_loader(
        cfg.data.train, batch_size=cfg.data.batch_size, transform=train_tf, tokenize=get_tokenizer(model),
        num_workers=cfg.data.num_workers, rank=rank, world_size=world, resampled=cfg.data.resampled,
        seed=tc.seed, shuffle=cfg.data.shuffle, strict=cfg.data.strict, drop_last=True,
        samples_per_epoch=cfg.data.samples_per_epoch, pin_memory=device.type == "cuda",
        draft_size=model.config.vision.image_size, caption_key=cfg.data.caption_key)
    if resume_from is not None:
        layout = [f"world_size {shared['world_size']} -> {world}"] if mine is None else \
            loader.layout_changes(mine["loader"])
        if layout:  # the same on every rank: they share the config, and all or none see a new world size
            epoch = resume.fresh_data_epoch(resume_from, shared["world_size"])
            loader.restart(epoch, mine["loader"]["stats"] if mine is not None else None)
            if rank == 0:
                warnings.warn(f"train.resume: {resume_from} resumes the model, optimizer, schedule and step, but not "
                              f"its data positions, which were saved for another layout ({', '.join(layout)}): the "
                              f"data goes on with epoch {epoch}, which no rank had begun", stacklevel=2)
        else:
            loader.load_state_dict(mine["loader"])
    batches, graphed = _batches(loader, resuming=resume_from is not None), []
    if tc.cuda_graphs:  # the first batch shows the shapes to capture for, and is then trained on
        first = next(batches)
        graphed = _capture_cuda_graphs(model, first, device, torch.bfloat16 if tc.precision == "bf16" else None)
        batches = chain([first], batches)
    if model.logit_bias is not None and cfg.loss.kind != "sigmoid":
        # the softmax loss does not read SigLIP's bias: it stays as it is, out of the optimizer and of DDP (which
        # would wait for its gradient)
        model.logit_bias.requires_grad_(False)
    if groups is not None:  # the experts' gradients are reduced by ep.reduce_expert_grads
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ep.expert_parameter_names(model))
    engine = expert_opt = expert_sched = None
    if tc.deepspeed is not None and groups is not None:  # the engine holds all but the experts' shards
        shards = set(ep.expert_parameter_names(model))
        opt, sched = build_optimizer(model, cfg.optim, tc.steps, only=lambda name: name not in shards)
        expert_opt, expert_sched = build_optimizer(model, cfg.optim, tc.steps, only=shards.__contains__)
    else:
        opt, sched = build_optimizer(model, cfg.optim, tc.steps)
    if tc.deepspeed is not None:  # the engine reduces the gradients, clips and steps `opt` and `sched`
        deepspeed_engine.ensure_process_group(device)
        net = engine = deepspeed_engine.initialize(model, opt, sched, cfg, world)
    else:
        # every parameter that trains gets a gradient each step, idle experts a zero one (their weights are operands
        # of the experts' batched products): no find_unused_parameters, and no walk of the graph every step for it
        net = DistributedDataParallel(model) if world > 1 else model

    start, history, load_sums, zeroshot_runs, validation_runs = 0, [], {}, [], []
    if resume_from is not None:
        if engine is not None:
            deepspeed_engine.load(engine, resume_from)
            if expert_opt is not None:
                expert_state = resume.optimizer_state(shared, "expert_optimizer", expert_opt, model)
                expert_opt.load_state_dict(ep.shard_optimizer_state(expert_state, expert_opt, model))
                expert_sched.load_state_dict(shared["scheduler"])
        else:
            opt_state = resume.optimizer_state(shared, "optimizer", opt, model)
            opt.load_state_dict(opt_state if groups is None else ep.shard_optimizer_state(opt_state, opt, model))
        sched.load_state_dict(shared["scheduler"])
        start, history, zeroshot_runs = shared["step"], shared["history"], shared["zeroshot"]
        validation_runs = shared.get("validation", [])  # checkpoints from before validation have none
        load_sums = {k: v.to(device) for k, v in shared["load_sums"].items()}
        if not layout:
            resume.restore_rng(mine["rng"])
        else:  # a random stream of its own for each rank and resume, not the start of the run's again
            torch.manual_seed(tc.seed + rank + 1_000_003 * start)
            random.seed(tc.seed + rank + 1_000_003 * start)

    saved = []  # the checkpoint folders written

    def checkpoint(snap: resume.Snapshot) -> None:
        # under DeepSpeed its engine writes the (partitioned) optimizer state, but not the experts' under expert
        # parallelism (`expert_opt`)
        weights, opt_state, expert_state = None, None, None
        if groups is not None:  # whole experts (every rank takes part in gathering them)
            weights = ep.full_state_dict(model)
            opt_state = ep.full_optimizer_state(opt, model) if engine is None else None
            expert_state = ep.full_optimizer_state(expert_opt, model) if expert_opt is not None else None
        elif rank == 0:
            weights, opt_state = model.state_dict(), None if engine is not None else opt.state_dict()
        extra = None if engine is None else lambda folder: deepspeed_engine.save(engine, folder)
        folder = resume.save_checkpoint(out_dir, snap, {
            "model": weights, "optimizer": opt_state, "expert_optimizer": expert_state,
            "scheduler": sched.state_dict(), "history": history, "load_sums": load_sums, "zeroshot": zeroshot_runs,
            "validation": validation_runs,
            "config": to_dict(cfg), "model_config": to_dict(model.config),  # the latter for resume.load_model
        } if rank == 0 else {}, rank, world, tc.keep_checkpoints, extra, group=waiting)
        if folder is not None:  # None: not written (a full disk), said in a warning; training goes on
            saved.append(folder)

    # the log is written as the run goes: a run that stops early (a NaN, a data error, Ctrl-C) keeps it; a
    # resumed run's log is the checkpoint's rows, then the new ones
    log = _MetricsLog(out_dir / "metrics.jsonl" if rank == 0 else None)
    log.write(history)
    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=not progress or rank != 0, dynamic_ncols=True,
               **bar_intervals(sys.stderr))
    done = start  # steps taken
    snap = resume.snapshot(start, loader) if tc.save_every else None  # as of the last finished step
    stopper = StopVote.for_world() if world > 1 else StopNow()  # several processes stop together (see StopVote)
    evaluating = bool(cfg.eval.zeroshot or cfg.data.eval)
    waiting = _waiting_group(tc.wait_minutes) if world > 1 else None
    stopper.install()
    scope = contextlib.ExitStack()  # what holds only while the loop runs (closed in the finally below)
    if engine is not None:
        deepspeed_engine.quiet_step_warnings(scope)
    pace = _Pace(cfg.data.batch_size * world * tc.accum_freq)
    try:
        for step in range(start, tc.steps):
            pace.start_step()
            micro = [stopper.next_batch(batches, rank) for _ in range(tc.accum_freq)]
            pace.got_batch()
            inputs = [(normalize_batch(b["image"].to(device, non_blocking=True), MEAN, STD),
                       b["text"].to(device, non_blocking=True)) for b in micro]

            def forward(j: int):
                # CUDA graphs cannot use autocast's cache of cast weights
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16",
                                    cache_enabled=not graphed):
                    return net(*inputs[j])

            if engine is not None:
                if expert_opt is not None:
                    expert_opt.zero_grad(set_to_none=True)
            else:
                opt.zero_grad(set_to_none=True)
            backward = engine.backward if engine is not None else torch.Tensor.backward
            if tc.accum_freq == 1:
                outs = [forward(0)]
                terms = total_loss(outs[0], cfg.loss)
                backward(terms["loss"])
            else:
                terms, outs = accumulated_backward(forward, tc.accum_freq, cfg.loss, backward,
                                                   getattr(net, "no_sync", contextlib.nullcontext), device)
            out = outs[-1]
            if groups is not None:
                ep.reduce_expert_grads(model)
            if engine is not None:  # clips only without ZeRO, whose step clips (the experts too)
                deepspeed_engine.clip_grad_norm_(engine, model, cfg.optim.grad_clip)
            elif cfg.optim.grad_clip and groups is not None:
                ep.clip_grad_norm_(model, cfg.optim.grad_clip)
            elif cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            with stopper.held():
                if engine is not None:
                    engine.step()  # clips, steps the optimizer and the schedule, zeroes the gradients
                    if expert_opt is not None and engine.was_step_applied():
                        expert_opt.step()
                        expert_sched.step()
                    deepspeed_engine.clamp_logit_scale(model)
                else:
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, math.log(100))
                done = step + 1
                if tc.save_every:  # this step's data position and RNG, for a checkpoint now or at Ctrl-C
                    snap = resume.snapshot(done, loader)
            for a in (a for o in outs for a in o.aux):
                key = f"{a.tower}.{a.block}"
                load_sums[key] = load_sums.get(key, 0) + a.tokens_per_expert.float()
            if step % tc.log_every == 0 or step == tc.steps - 1:
                row = {"step": step, "lr": sched.get_last_lr()[0], **{k: v.item() for k, v in terms.items()}}
                row["speed"] = pace.since_last_row()
                if out.aux:
                    row["moe"] = moe_report(out)
                history.append(row)
                if not math.isfinite(row["loss"]):
                    log.write(history)
                    raise ClipmoeError(f"loss is {row['loss']} at step {step}; lower optim.lr or use precision fp32"
                                       + (f" (the log so far: {log.path})" if log.path else ""))
                bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)  # shown at the next redraw
            bar.update(1)
            pace.end_step()  # what follows (evaluation, checkpoints) is not training speed
            ev = cfg.eval
            if evaluating and ((ev.every and (step + 1) % ev.every == 0) or step == tc.steps - 1):
                whole = ep.gathered(model)  # under expert parallelism a copy with all experts (all ranks)
                if rank == 0 and ev.zeroshot:
                    zeroshot_runs.append(_evaluate(whole, ev, step, history))
                if rank == 0 and cfg.data.eval:
                    validation_runs.append(_validate(whole, cfg, step, history))
                if waiting is not None:
                    dist.barrier(group=waiting)
                model.train()
            log.write(history)  # after the evaluation, which adds to its row
            if tc.save_every and (done % tc.save_every == 0 or done == tc.steps):
                checkpoint(snap)
    except (KeyboardInterrupt, loaders.DataError) as e:
        # Ctrl-C, SIGTERM, or data the loader cannot go on with (strict mode, too many bad samples): the steps done
        # are a shorter run, written out like a finished one (never lost work); a second signal stops the writing,
        # as it would without clipmoe
        stopper.restore()
        if done == start:
            raise
        stopped_by = e
        together = stopper.agreed  # every rank stopped at this same step
        log.write(history)
        # resumable where every rank stopped at this step (one process, or agreed: a rank that stopped alone may
        # have left the others mid-step); unless this step's checkpoint is already written
        if tc.save_every and together and snap.step == done and not (
                saved and saved[-1].name.endswith(f"_{done:08d}")):
            checkpoint(snap)
    else:
        stopped_by, together = None, True
    finally:
        stopper.close()
        if waiting is not None:
            dist.destroy_process_group(waiting)
        scope.close()
        bar.close()
        log.close()
    replays = {f"{m.tower}.{m.block}": m.__dict__["_cuda_graph"].replays for m in graphed}
    for layer in graphed:  # the graphs hold memory, and a model with them cannot be copied
        cuda_graphs.release(layer)

    # the trained model with all its experts; not after a stop the ranks did not agree on, under expert
    # parallelism, where a rank may be gone (its periodic checkpoints hold the whole model)
    if groups is not None and together:
        model = ep.gathered(model)
    expert_load = {k: (v / v.sum()).tolist() for k, v in load_sums.items()}
    result = TrainResult(model.eval(), history, expert_load, loader.stats(), out_dir, zeroshot=zeroshot_runs,
                         validation=validation_runs, cuda_graphs=replays, steps=done)
    if rank == 0:
        try:
            result.files = write_run_outputs(result, save_model=not ep.is_sharded(model))
        except (OSError, SafetensorError) as e:  # a full disk: one line, and where the run's state still is
            raise ClipmoeError(f"the run's outputs could not all be written in {out_dir} ({write_failure(e, out_dir)})"
                               + (f"; its newest checkpoint is {saved[-1]}" if saved else "")) from None
        if saved:
            result.files["checkpoint"] = saved[-1]
    if isinstance(stopped_by, loaders.DataError):
        raise loaders.DataError(f"{stopped_by} (training stopped {_kept(result, tc.steps)})") from stopped_by
    if stopped_by is not None:
        raise TrainingInterrupted(result, tc.steps, signal.SIGTERM if isinstance(stopped_by, Terminated) else
                                  signal.SIGINT)
    return result


class _Pace:
    """Training speed for the log rows: samples per second (all ranks) and the share of the time spent waiting for
    the loader, over the steps finished since the last row and over their own time (evaluations and checkpoints
    left out). A step's time ends after its logging, whose .item() waits for the device's work."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.steps, self.busy, self.waiting, self.t0, self.t_batch = 0, 0.0, 0.0, 0.0, 0.0

    def start_step(self) -> None:
        self.t0 = time.perf_counter()

    def got_batch(self) -> None:
        self.t_batch = time.perf_counter()

    def end_step(self) -> None:
        self.busy += time.perf_counter() - self.t0
        self.waiting += self.t_batch - self.t0
        self.steps += 1

    def since_last_row(self) -> dict:
        """The speed of the steps finished since the last call (None before any), and a new count."""
        speed = {"samples_per_s": round(self.steps * self.samples_per_step / self.busy, 1) if self.steps else None,
                 "data_wait": round(self.waiting / self.busy, 3) if self.steps else None}
        self.steps, self.busy, self.waiting = 0, 0.0, 0.0
        return speed


def _capture_cuda_graphs(model: CLIP, first: dict, device: torch.device, autocast_dtype) -> list[MoE]:
    """Captures the MoE layers that CUDA graphs can run (the image tower's sync-free ones) for the shapes of
    batch `first`."""
    if device.type != "cuda":
        raise ClipmoeError(f"train.cuda_graphs needs a CUDA device; training runs on {device}")
    images = normalize_batch(first["image"].to(device), MEAN, STD)
    layers = cuda_graphs.capture_model(model, images, first["text"].to(device), autocast_dtype=autocast_dtype)
    if not layers:
        raise ClipmoeError("train.cuda_graphs: no MoE layer to capture (graphs take the image tower's MoE layers; "
                           "the text tower's run eagerly, since their token masks change the shapes; in fp32 "
                           "only layers with a capacity factor or expert choice can be captured, not dropless ones)")
    return layers


def _evaluate(model: CLIP, ev, step: int, history: list[dict]) -> dict:
    """Zero-shot metrics now; the top-1 (or first metric) of each dataset also goes in this step's log row."""
    results = zeroshot_eval(model.eval(), ev.zeroshot, ev.data_root, batch_size=ev.batch_size, progress=False,
                            device=str(next(model.parameters()).device))
    summary = {r["dataset"]: (r["metrics"].get("top1", next(iter(r["metrics"].values()))) if "metrics" in r
                              else None) for r in results}
    if history and history[-1]["step"] == step:
        history[-1]["zeroshot"] = summary
    return {"step": step, "results": results}


def _with_logit_bias(section: ModelSection) -> ModelSection:
    """The model section for the sigmoid loss: an architecture without a logit bias gets SigLIP's start
    (bias -10, and scale log 10 unless set), as open_clip's --siglip does. A saved clipmoe model keeps its own."""
    if canonical_name(str(section.arch)) not in list_architectures():
        return section
    if get_model_config(section.arch, section.overrides or None).init_logit_bias is not None:
        return section
    start = {"init_logit_bias": -10.0, "init_logit_scale": section.overrides.get("init_logit_scale", math.log(10))}
    return dataclasses.replace(section, overrides=deep_merge(section.overrides, start))


def _validate(model: CLIP, cfg: RunConfig, step: int, history: list[dict]) -> dict:
    """Validation on data.eval now; its loss and recall@1 both ways also go in this step's log row. Held-out data
    that cannot be read is an `error` entry and a warning: the training goes on."""
    try:
        metrics = validate(model, cfg.data.eval, batch_size=cfg.data.batch_size, loss_kind=cfg.loss.kind,
                           precision=cfg.train.precision, num_workers=cfg.data.num_workers,
                           caption_key=cfg.data.caption_key)
    except (loaders.DataError, ValueError, OSError) as e:
        warnings.warn(f"data.eval at step {step}: {e}; training goes on", stacklevel=2)
        return {"step": step, "error": str(e)}
    if history and history[-1]["step"] == step:
        history[-1]["val"] = {k: metrics[k] for k in ("loss", "image_retrieval_recall@1", "text_retrieval_recall@1")}
    return {"step": step, **metrics}


class _MetricsLog:
    """metrics.jsonl, written as the run goes (path None: no file, on ranks other than 0). A write that fails (a full
    disk) is undone, so that the file holds whole rows only, is said once in a warning, and is tried again with
    the next rows: the run goes on, and its log is whole once the disk has room."""

    def __init__(self, path: Optional[Path]):
        self.path, self.rows, self.size, self.warned = path, 0, 0, False
        self._fd = None if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, history: list[dict]) -> None:
        """Writes the rows of `history` not yet written (called every step; most steps add none)."""
        if self._fd is None or len(history) <= self.rows:
            return
        data = memoryview("".join(json.dumps(row) + "\n" for row in history[self.rows:]).encode())
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            try:  # the part written goes, so that a row is never cut
                os.ftruncate(self._fd, self.size)
                os.lseek(self._fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            if not self.warned:
                self.warned = True
                warnings.warn(f"{self.path}: rows not written ({write_failure(e, self.path.parent)}); training "
                              "goes on, and they are written once there is room", stacklevel=2)
            return
        self.size, self.rows = os.lseek(self._fd, 0, os.SEEK_CUR), len(history)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_run_outputs(result: TrainResult, save_model: bool = True) -> dict:
    """Model and plots of a finished run, in its output folder, beside the metrics log `train` wrote as it went."""
    out = result.out_dir
    files = {"model": save(result.model, out / "model.safetensors")} if save_model else {}
    files.update({
        "metrics": out / "metrics.jsonl",
        "loss_plot": plot_losses(result.history, out / "loss.png", result.validation),
    })
    if result.validation:
        files["validation"] = out / "validation.json"
        files["validation"].write_text(json.dumps(result.validation, indent=2))
    if result.zeroshot:
        files["zeroshot"] = out / "zeroshot.json"
        files["zeroshot"].write_text(json.dumps(result.zeroshot, indent=2))
        files["zeroshot_plot"] = plot_zeroshot(result.zeroshot[-1]["results"], out / "zeroshot.png")
    if result.expert_load:
        files["expert_load_plot"] = plot_expert_load(result.expert_load, out / "expert_load.png")
        files["moe_plot"] = plot_moe_history(result.history, out / "moe.png")
    return files
