"""Typed configuration: model, MoE, data, loss, optimiser and training sections, read from YAML.

Flow: YAML file (with `base:` derivation) -> `--set a.b=c` overrides -> `from_dict` validation into the
dataclasses below -> each builder gets only its own section.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# Model


@dataclass
class MoEConfig:
    """Which blocks of a tower get a sparse MoE MLP, and how tokens are routed to experts."""

    num_experts: int = 8
    top_k: int = 2
    # Placement: exactly one of `every` (blocks every-1, 2*every-1, ...), `last` (the last n blocks)
    # or `blocks` (explicit indices) decides; `last` or `blocks` (not both) wins over `every`.
    every: int = 2
    last: Optional[int] = None
    blocks: Optional[list[int]] = None
    capacity_factor: Optional[float] = 1.25  # None: dropless
    # None (dropless) at evaluation keeps embeddings independent of what else is in the batch;
    # ST-MoE evaluates at 2.0.
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 4
    # k = 1 only: "multiply" scales the expert output by its gate (Switch); "straight_through" keeps the
    # value 1 with the gate's gradient, so an upcycled model equals its dense source at step 0.
    k1_gate: str = "multiply"
    expert_mlp_ratio: Optional[float] = None  # expert hidden width / tower width; None: the tower's
    # "topk": tokens choose experts; "expert_choice": each expert takes its top C tokens (Zhou et al.
    # 2022), C = ceil(N * capacity_factor / E) (2.0 in the paper). Null is dropless there too: C = N, every
    # expert may take every token (E times a dense layer's compute); a null eval factor keeps training's.
    router: str = "topk"
    # expert choice only: "topk" evaluates as token choice (each token its top_k experts, weighted by their raw
    # probabilities as expert choice weighs them; eval_capacity_factor null = dropless), so that an embedding
    # does not depend on what else is in the batch; null evaluates with expert choice
    eval_router: Optional[str] = None
    batch_priority: bool = False  # V-MoE's Batch Prioritized Routing: confident tokens claim slots first
    jitter: float = 0.0  # Switch: router inputs times U(1 - jitter, 1 + jitter) in training
    shared_expert: bool = False  # an always-on dense MLP beside the experts
    # Per layer: block index -> the settings that differ in that block's MoE layer, e.g. {11: {top_k: 1}}; any
    # field above but the placement (every, last, blocks). The blocks named must be MoE blocks of the tower.
    per_block: Optional[dict] = None

    def __post_init__(self):
        _check_ints(self, "num_experts", "top_k", "every", "min_capacity", *(() if self.last is None else ("last",)))
        _check(self.num_experts >= 1, "num_experts", self.num_experts, "must be >= 1")
        _check(1 <= self.top_k <= self.num_experts, "top_k", self.top_k,
               f"must be in 1..num_experts ({self.num_experts})")
        _check(self.every >= 1, "every", self.every, "must be >= 1")
        _check(self.last is None or self.last >= 1, "last", self.last, "must be >= 1")
        _check(self.last is None or self.blocks is None, "blocks", self.blocks,
               f"and last ({self.last}) both place the MoE layers: give one, the other null")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            _check(v is None or v > 0, name, v, "must be > 0 or null (dropless)")
        _check(self.min_capacity >= 0, "min_capacity", self.min_capacity, "must be >= 0")
        _check(self.k1_gate in ("multiply", "straight_through"), "k1_gate", self.k1_gate,
               "must be 'multiply' or 'straight_through'")
        _check(self.expert_mlp_ratio is None or self.expert_mlp_ratio > 0, "expert_mlp_ratio",
               self.expert_mlp_ratio, "must be > 0")
        _check(self.router in ("topk", "expert_choice"), "router", self.router, "must be 'topk' or 'expert_choice'")
        _check(self.eval_router in (None, "topk"), "eval_router", self.eval_router, "must be 'topk' or null")
        _check(self.eval_router is None or self.router == "expert_choice", "eval_router", self.eval_router,
               "applies to router 'expert_choice' only (token choice already evaluates with top-k)")
        _check(0 <= self.jitter < 1, "jitter", self.jitter, "must be in [0, 1)")
        if self.per_block is not None:
            self.per_block = _per_block_settings(self)

    def for_block(self, block: int) -> "MoEConfig":
        """The settings of the MoE layer in block `block`: these with its `per_block` entry, if any, applied."""
        return dataclasses.replace(self, per_block=None, **(self.per_block or {}).get(block, {}))

    def moe_blocks(self, depth: int) -> list[int]:
        """Indices of the blocks whose MLP is an MoE layer, in a tower of `depth` blocks."""
        if self.blocks is not None:
            return sorted(set(self.blocks))
        if self.last is not None:
            return list(range(max(0, depth - self.last), depth))
        return [i for i in range(depth) if i % self.every == self.every - 1]


_PLACEMENT = ("every", "last", "blocks", "per_block")


def _per_block_settings(cfg: MoEConfig) -> dict:
    """`per_block` checked and normalised: integer keys (JSON and `--set` give "11" for 11; both forms of one block
    merge, the later winning), each entry's values typed and checked as the fields themselves, in the layer's
    full settings (a per-block top_k must fit the per-block num_experts)."""
    _check(isinstance(cfg.per_block, dict), "per_block", cfg.per_block,
           "must map block indices to settings, e.g. {11: {top_k: 1}}")
    merged: dict[int, dict] = {}
    for key, settings in cfg.per_block.items():
        block = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        _check(isinstance(block, int) and not isinstance(block, bool), "per_block", key, "is not a block index")
        _check(isinstance(settings, dict), f"per_block.{block}", settings,
               "must be a mapping of MoE settings, e.g. {top_k: 1}")
        merged.setdefault(block, {}).update(settings)
    tower = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _PLACEMENT}
    out = {}
    for block, settings in sorted(merged.items()):
        placed = next((k for k in settings if k in _PLACEMENT), None)
        _check(placed is None, f"per_block.{block}.{placed}", settings.get(placed),
               "places the MoE layers: set it for the tower, not per block")
        try:
            layer = from_dict(MoEConfig, {**tower, **settings}, f"per_block.{block}")
        except ConfigError as e:  # re-raised as the field's error, which from_dict prefixes with the section's path
            key, _, detail = str(e).partition(": ")
            raise _FieldError(key, detail) from None
        out[block] = {k: getattr(layer, k) for k in settings}
    return out


@dataclass
class VisionConfig:
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224
    patch_size: int = 32
    moe: Optional[MoEConfig] = None
    ls_init_value: Optional[float] = None  # LayerScale (CaiT) on both residual branches, its initial gain; None: none
    # FLIP: the fraction of patch tokens each image drops in training (open_clip's patch_dropout; 0.5-0.75 in the
    # paper); evaluation and embeddings see every patch
    patch_dropout: float = 0.0

    def __post_init__(self):
        _check_tower(self)
        _check(0 <= self.patch_dropout < 1, "patch_dropout", self.patch_dropout, "must be in [0, 1)")
        _check(self.image_size % self.patch_size == 0, "image_size", self.image_size,
               f"must be a multiple of patch_size ({self.patch_size})")


@dataclass
class TextConfig:
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    moe: Optional[MoEConfig] = None
    ls_init_value: Optional[float] = None  # as the image tower's

    def __post_init__(self):
        _check_tower(self)
        _check(self.context_length >= 2, "context_length", self.context_length, "must be >= 2")


@dataclass
class ModelConfig:
    """A CLIP architecture: the two towers, the shared embedding width and the activation."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    name: str = ""
    # a learned logit bias (SigLIP: -10, with init_logit_scale log 10), which the sigmoid loss needs; None: none
    init_logit_bias: Optional[float] = None

    def __post_init__(self):
        _check(self.embed_dim >= 1, "embed_dim", self.embed_dim, "must be >= 1")


def _check_ints(cfg, *names: str) -> None:
    """Integer fields given as other types from Python (YAML goes through `from_dict`, which checks types): one
    error naming the field, not a TypeError from deep inside torch."""
    for name in names:
        v = getattr(cfg, name)
        _check(isinstance(v, int) and not isinstance(v, bool), name, v, "must be an integer")


def _check_tower(cfg) -> None:
    _check_ints(cfg, "width", "depth", "num_heads")
    for name in ("width", "depth", "num_heads"):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), "must be >= 1")
    _check(cfg.width % cfg.num_heads == 0, "width", cfg.width,
           f"must be divisible by num_heads ({cfg.num_heads})")
    _check(cfg.mlp_ratio > 0, "mlp_ratio", cfg.mlp_ratio, "must be > 0")
    _check(cfg.ls_init_value is None or math.isfinite(cfg.ls_init_value), "ls_init_value", cfg.ls_init_value,
           "must be a finite number or null")
    if cfg.moe is not None and cfg.moe.blocks is not None:
        bad = [b for b in cfg.moe.blocks if not 0 <= b < cfg.depth]
        _check(not bad, "moe.blocks", cfg.moe.blocks, f"has indices outside 0..{cfg.depth - 1}")
    elif cfg.moe is not None and cfg.moe.last is not None:  # more than there are: a config for another tower
        _check(cfg.moe.last <= cfg.depth, "moe.last", cfg.moe.last, f"is more than the tower's {cfg.depth} blocks")
    if cfg.moe is not None and not cfg.moe.moe_blocks(cfg.depth):  # asked for MoE, would get none
        key = "blocks" if cfg.moe.blocks is not None else "every"
        _check(False, f"moe.{key}", getattr(cfg.moe, key), f"places no MoE layer in a tower of {cfg.depth} blocks")
    if cfg.moe is not None and cfg.moe.per_block:
        placed = cfg.moe.moe_blocks(cfg.depth)
        stray = [b for b in cfg.moe.per_block if b not in placed]
        _check(not stray, "moe.per_block", stray, f"names blocks without an MoE layer (this tower's: {placed})")


# ---------------------------------------------------------------------------------------------------
# Run


@dataclass
class UpcycleConfig:
    """How a dense `pretrained` checkpoint fills MoE layers (sparse upcycling; see clipmoe.upcycle)."""

    noise_std: float = 0.0  # relative noise on each expert copy
    reinit_fraction: float = 0.0  # Drop-Upcycling: share of each expert's hidden units re-initialised
    seed: int = 0

    def __post_init__(self):
        _check(self.noise_std >= 0, "noise_std", self.noise_std, "must be >= 0")
        _check(0 <= self.reinit_fraction <= 1, "reinit_fraction", self.reinit_fraction, "must be in [0, 1]")


@dataclass
class ModelSection:
    """The model of a run: an architecture by name, optional weights, overrides and upcycling. A dense
    `pretrained` checkpoint under overrides that add MoE layers is upcycled into them (`upcycle`)."""

    arch: str = "ViT-B-32"
    pretrained: Optional[str] = None
    overrides: dict = field(default_factory=dict)  # merged into the architecture's ModelConfig
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)


@dataclass
class DataConfig:
    train: str = ""  # shard spec: brace pattern, comma-free path list or a single tar
    eval: Optional[str] = None  # held-out shards, validated at eval.every steps and at the end (validation.py)
    batch_size: int = 256
    num_workers: int = 0
    resampled: bool = False  # shards drawn with replacement; an "epoch" is samples_per_epoch samples
    samples_per_epoch: Optional[int] = None
    shuffle: bool = True
    strict: bool = False
    # the caption: "txt" (key.txt), a field of key.json ("caption"; a list value: its first), or a list of these,
    # one drawn at random per sample (several captions per image)
    caption_key: Union[str, list[str]] = "txt"
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop's area range (open_clip)

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        keys = [self.caption_key] if isinstance(self.caption_key, str) else self.caption_key
        _check(bool(keys) and all(keys), "caption_key", self.caption_key, "must be a key or a list of keys")
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
               self.crop_scale, "must be [low, high] with 0 < low <= high <= 1")
        _check(not self.resampled or (self.samples_per_epoch or 0) >= 1, "samples_per_epoch",
               self.samples_per_epoch, "must be >= 1 with resampled: true")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")


@dataclass
class EntropyLossConfig:
    """LIMoE's per-modality entropy losses (Mustafa et al. 2022), for one tower's MoE layers."""

    local_coef: float = 0.0  # times mean_i H(p(.|x_i)): confident routing per token
    global_coef: float = 0.0  # times max(0, threshold - H(mean_i p(.|x_i))): use enough experts
    global_threshold: Optional[float] = None  # nats; null: log(num_experts)

    def __post_init__(self):
        for name in ("local_coef", "global_coef"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _check(self.global_threshold is None or self.global_threshold >= 0, "global_threshold",
               self.global_threshold, "must be >= 0")


@dataclass
class LossConfig:
    balance_coef: float = 0.01  # Switch load-balancing loss, on token-choice layers (expert choice needs none)
    z_coef: float = 1e-3  # ST-MoE router z-loss
    image_entropy: EntropyLossConfig = field(default_factory=EntropyLossConfig)
    text_entropy: EntropyLossConfig = field(default_factory=EntropyLossConfig)
    local_loss: bool = True
    gather_with_grad: bool = True
    # "softmax": CLIP's InfoNCE both ways; "sigmoid": SigLIP's pairwise loss (a model without init_logit_bias
    # gets SigLIP's start: bias -10, scale log 10)
    kind: str = "softmax"
    # how the sigmoid loss gets the other ranks' texts: "gather" (all-gather) or "bidir" (point to point from the
    # neighbours on both sides, one block at a time; open_clip's --loss-dist-impl bidir). The same loss
    dist_impl: str = "gather"

    def __post_init__(self):
        _check(self.kind in ("softmax", "sigmoid"), "kind", self.kind, "must be 'softmax' or 'sigmoid'")
        _check(self.dist_impl in ("gather", "bidir"), "dist_impl", self.dist_impl, "must be 'gather' or 'bidir'")
        _check(self.dist_impl == "gather" or self.kind == "sigmoid", "dist_impl", self.dist_impl,
               "applies to kind: sigmoid (the softmax loss all-gathers)")
        for name in ("balance_coef", "z_coef"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: Optional[float] = 1.0
    # after the warmup (open_clip's --lr-scheduler): "cosine" to 0 at train.steps; "const"; "const-cooldown": const,
    # then over the last cooldown_steps down to cooldown_end_lr, as (1 - t) ** cooldown_power
    schedule: str = "cosine"
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    cooldown_end_lr: float = 0.0

    def __post_init__(self):
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0")
        _check(self.schedule in ("cosine", "const", "const-cooldown"), "schedule", self.schedule,
               "must be 'cosine', 'const' or 'const-cooldown'")
        _check((self.cooldown_steps >= 1) == (self.schedule == "const-cooldown"), "cooldown_steps",
               self.cooldown_steps, "must be >= 1 with schedule const-cooldown, and 0 with another schedule")
        _check(self.cooldown_power > 0, "cooldown_power", self.cooldown_power, "must be > 0")
        _check(0 <= self.cooldown_end_lr <= self.lr, "cooldown_end_lr", self.cooldown_end_lr,
               f"must be in [0, lr ({self.lr})]")


@dataclass
class TrainConfig:
    steps: int = 1000
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; router and losses stay fp32)
    seed: int = 0
    log_every: int = 10
    out_dir: str = "runs/default"
    device: str = "auto"
    # replay the image tower's sync-free MoE layers as CUDA graphs (cuda_graphs.capture): needs a GPU, and
    # in fp32 a capacity factor or expert choice (bf16 runs dropless layers on grouped_mm too)
    cuda_graphs: bool = False
    # activation checkpointing per block (CLIP.set_grad_checkpointing): less memory for about one more forward
    grad_checkpointing: bool = False
    # LiT: freeze a tower but its last N groups (CLIP.lock_image_tower / lock_text_tower, open_clip's --lock-*)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # training checkpoints (model, optimizer, schedule, data position, RNG: clipmoe.resume) in OUT/checkpoints
    # every this many steps, at the end and at Ctrl-C; 0: none
    save_every: int = 0
    keep_checkpoints: int = 1  # the newest this many are kept
    # continue a run exactly: "latest" (this run's newest checkpoint; a fresh start when there is none), a run
    # folder, or a checkpoints/step_N folder; on other ranks, workers or shards, all but the data positions (the
    # data goes on with a fresh epoch)
    resume: Optional[str] = None
    # expert parallelism (clipmoe.expert_parallel): each group of this many consecutive ranks splits every MoE
    # layer's experts among its ranks and exchanges tokens by all-to-all; 1: every rank holds all experts
    expert_parallel_size: int = 1
    # train under DeepSpeed's engine with this DeepSpeed config (clipmoe.deepspeed_engine), e.g.
    # {zero_optimization: {stage: 2}}; batch size, optimizer, clipping and precision come from clipmoe's config
    deepspeed: Optional[dict] = None
    # how long the other ranks wait while rank 0 works alone (evaluating, writing a checkpoint), in a group of
    # their own: the training groups' timeouts (torch's 30 minutes for gloo, 10 for NCCL) would end the run
    wait_minutes: float = 360.0
    # open_clip's --accum-freq: each step's gradient is that of this many loader batches (data.batch_size per rank
    # each) as one batch of their total size, the contrastive loss over all of it (clipmoe.accumulation), for about
    # one more forward per batch and the activations of one batch in memory
    accum_freq: int = 1

    def __post_init__(self):
        _check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        _check(self.accum_freq >= 1, "accum_freq", self.accum_freq, "must be >= 1")
        _check(self.accum_freq == 1 or self.deepspeed is None, "accum_freq", self.accum_freq,
               "is not supported under train.deepspeed (its engine steps once per backward)")
        _check(self.accum_freq == 1 or not self.cuda_graphs, "accum_freq", self.accum_freq,
               "cannot be combined with cuda_graphs (each batch is embedded twice, once without gradients)")
        _check(self.wait_minutes > 0, "wait_minutes", self.wait_minutes, "must be > 0")
        _check(self.expert_parallel_size >= 1, "expert_parallel_size", self.expert_parallel_size, "must be >= 1")
        _check(not (self.expert_parallel_size > 1 and self.cuda_graphs), "cuda_graphs", self.cuda_graphs,
               "cannot be combined with expert_parallel_size > 1 (the all-to-all's sizes are read on the host)")
        _check(self.deepspeed is None or not self.cuda_graphs, "cuda_graphs", self.cuda_graphs,
               "is not supported under train.deepspeed")
        _check(not (self.grad_checkpointing and self.cuda_graphs), "grad_checkpointing", self.grad_checkpointing,
               "cannot be combined with cuda_graphs (a graph's replay cannot be recomputed in the backward)")
        _check(self.precision in ("fp32", "bf16"), "precision", self.precision, "must be fp32 or bf16")
        _check(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        _check(self.save_every >= 0, "save_every", self.save_every, "must be >= 0 (0: no checkpoints)")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training, with the same functions as `clipmoe zeroshot`; `every` and the end
    of training are also when data.eval is validated."""

    zeroshot: list[str] = field(default_factory=list)  # dataset names (zeroshot.list_datasets()) or "folder"
    data_root: Optional[str] = None
    every: int = 0  # steps between evaluations; 0 = at the end only
    batch_size: int = 64

    def __post_init__(self):
        _check(not self.zeroshot or bool(self.data_root), "data_root", self.data_root,
               "must be set when zeroshot datasets are given")
        _check(self.every >= 0, "every", self.every, "must be >= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        o, steps = self.optim, self.train.steps
        if o.cooldown_steps and o.warmup_steps + o.cooldown_steps > steps:
            raise ConfigError(f"optim.cooldown_steps: {o.cooldown_steps} after optim.warmup_steps ({o.warmup_steps}) "
                              f"do not fit in train.steps ({steps})")


# ---------------------------------------------------------------------------------------------------
# Validation


class _FieldError(ConfigError):
    """Raised inside __post_init__ (so a dataclass built in Python fails with a ConfigError naming its
    field); `from_dict` re-raises it with the dotted path of the section."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.key, self.detail = key, detail


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise _FieldError(key, f"{value!r} {why}")


def from_dict(cls, data: Any, path: str = ""):
    """Builds dataclass `cls` from a plain dict, checking keys, types and values.

    Raises ConfigError naming the dotted key (e.g. `model.overrides.vision.moe.top_k`).
    """
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(path, key)}: unknown key{_guess(cls, path, str(key), names)} "
                              f"(expected one of: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except _FieldError as e:
        raise ConfigError(f"{_join(path, e.key)}: {e.detail}") from None


_ALIASES = {"image": "vision", "visual": "vision", "img": "vision", "txt": "text"}  # open_clip's, and short forms


def _guess(cls, path: str, key: str, names: set) -> str:
    """For an unknown key: a near spelling in its section, or where a key of that name lives in a run config."""
    near = [_ALIASES[key]] if _ALIASES.get(key) in names else difflib.get_close_matches(key, sorted(names), 2, 0.75)
    if near:
        return f" (did you mean {' or '.join(_join(path, n) for n in near)}?)"
    sections = _run_config_sections()
    if sections.get(path) is not cls:  # not a section of a run config (a checkpoint's model, create_model's)
        return ""
    name = _ALIASES.get(key, key)
    homes = [p for p, _ in _run_config_keys() if p.rsplit(".", 1)[-1] == name]
    return f" (is it {' or '.join(homes[:3])}?)" if homes else ""


def _run_config_keys(cls=None, path: str = ""):
    """(dotted key, its dataclass or None) for every key of a run config; model.overrides holds a ModelConfig."""
    for f in dataclasses.fields(cls or RunConfig):
        key = _join(path, f.name)
        tp = typing.get_type_hints(cls or RunConfig)[f.name]
        tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)  # Optional[X] -> X
        sub = ModelConfig if key == "model.overrides" else tp if dataclasses.is_dataclass(tp) else None
        yield key, sub
        if sub is not None:
            yield from _run_config_keys(sub, key)


def _run_config_sections() -> dict:
    return {"": RunConfig, **{k: sub for k, sub in _run_config_keys() if sub is not None}}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _coerce(tp, value: Any, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        first = None
        for alternative in args:  # the first type that takes the value (str | list[str]); else the first's error
            try:
                return _coerce(alternative, value, path)
            except ConfigError as e:
                first = first or e
        raise first
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}{_brace_range_hint(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this module, not user input


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------
# YAML files, `base:` derivation and `--set` overrides


def deep_merge(base: dict, update: dict) -> dict:
    """Returns `base` updated by `update`; nested mappings merge, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# a shard range, which YAML reads as a mapping ({00000..00007} -> {'00000..00007': None}) or a syntax error
_RANGE = r"\d+\.\.\d+"
_BRACE_RANGE = re.compile(r"\{" + _RANGE + r"\}")
_QUOTE_RANGE = "; quote a value holding a shard range: train: 'shards/{00000..00007}.tar'"


def _brace_range_hint(value: Any) -> str:
    """The quoting hint, for a value that is a shard range YAML took apart."""
    found = isinstance(value, dict) and any(isinstance(k, str) and re.fullmatch(_RANGE, k) for k in value)
    return _QUOTE_RANGE if found or (isinstance(value, str) and _BRACE_RANGE.search(value)) else ""


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Reads a YAML config, resolving `base:` (a path relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        lines = text.splitlines()
        hint = _brace_range_hint(lines[mark.line]) if mark and mark.line < len(lines) else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}{hint}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` strings; values are parsed as YAML scalars (`1e-3`, `true`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:  # a shard range stays the string it is: YAML would read a mapping into it
            value = raw if _BRACE_RANGE.search(raw) else yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            p = _yaml_key(node, p)
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = child
        node[_yaml_key(node, parts[-1])] = value
    return data


def _yaml_key(node: dict, part: str):
    """The key of `node` that a dotted path's `part` names: the number where YAML read one (moe.per_block.11)."""
    return int(part) if part not in node and part.isdigit() and int(part) in node else part


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """YAML file -> `base:` chain -> overrides -> validated RunConfig."""
    data = apply_overrides(read_yaml(path), list(overrides))
    return from_dict(RunConfig, data)


def as_run_config(cfg: RunConfig | str | Path | dict) -> RunConfig:
    """A RunConfig from itself, a YAML file (`load_run_config`) or a dict in the YAML's layout (no `base:`)."""
    if isinstance(cfg, RunConfig):
        return cfg
    if isinstance(cfg, (str, Path)):
        return load_run_config(cfg)
    if isinstance(cfg, dict):
        return from_dict(RunConfig, cfg)
    raise ConfigError(f"a run config is a RunConfig, a YAML file or a dict, not {type(cfg).__name__}")
