"""Sparse upcycling (Komatsuzaki et al. 2022): a dense CLIP becomes an MoE CLIP whose experts are copies
of the dense MLPs and whose routers start at zero, so that, with renormalised top-k (or a
straight-through gate for k = 1) and no dropped tokens, it computes what the dense model computed."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from .architectures import canonical_name, config_from_weights, list_architectures
from .checkpoint import is_clipmoe_file, is_torchscript, load, load_weights, read_checkpoint
from .config import MoEConfig, UpcycleConfig
from .errors import ClipmoeError, ConfigError
from .model import CLIP

TOWERS = ("image", "text")


def upcycle(
    model: Union[CLIP, torch.nn.Module, Mapping[str, torch.Tensor], str, Path],
    num_experts: int = 8,
    top_k: int = 2,
    every: int = 2,
    towers: Sequence[str] = TOWERS,
    *,
    router: str = "topk",
    capacity_factor: Optional[float] = None,
    eval_capacity_factor: Optional[float] = None,
    batch_priority: bool = False,
    eval_router: Optional[str] = None,
    min_capacity: int = 4,
    jitter: float = 0.0,
    shared_expert: bool = False,
    last: Optional[int] = None,
    blocks: Optional[list[int]] = None,
    per_block: Optional[dict] = None,
    noise_std: float = 0.0,
    reinit_fraction: float = 0.0,
    arch: Optional[str] = None,
    seed: int = 0,
) -> CLIP:
    """Returns a new MoE model upcycled from a dense one (`model` itself is not changed), on its device and in
    its dtype.

    Args:
        model: a clipmoe CLIP model, the path of a `clipmoe.save` file, an open_clip / OpenAI checkpoint file,
            an open_clip model or a state dict (open_clip's or clipmoe's keys).
        arch: the architecture of an open_clip model, state dict or file (e.g. 'ViT-B-32'). Without it, the
            weights' shapes give it (`architectures.config_from_weights`): an open_clip model also gives its
            heads and activation, an OpenAI archive is QuickGELU, and other weights get open_clip's heads
            for their shapes and GELU, with a warning (QuickGELU weights need arch='...-quickgelu').
        num_experts, top_k: experts per MoE layer and experts per token (token-choice routing).
        every / last / blocks: placement, per tower (every n-th block, the last n, or explicit indices).
        per_block: settings that differ in some MoE blocks, e.g. {11: {"top_k": 1}} (MoEConfig.per_block); the
            blocks must be MoE blocks of each tower upcycled.
        towers: which towers get MoE layers: "image", "text", or a sequence of them.
        router: "topk" (token choice) or "expert_choice".
        capacity_factor, eval_capacity_factor: None (default) is dropless, which keeps the model equal
            to its source; a float drops tokens past capacity. For expert choice, C = N * factor / E, and
            dropless (None, or factor = num_experts) is C = N: every expert takes every token, its output
            weighted by the router's probability, which again equals the source (at E times the compute).
        batch_priority, eval_router, min_capacity, jitter: as in MoEConfig (eval_router "topk": an expert-choice
            model evaluates with token choice, so that embeddings do not depend on the rest of the batch).
        shared_expert: an always-on dense expert beside the routed ones; it starts as the dense MLP with a
            zero output projection, so the model still starts equal to its source.
        noise_std: relative std of Gaussian noise added to each expert copy to break their symmetry.
        reinit_fraction: Drop-Upcycling (Nakamura et al. 2025): this fraction of each expert's hidden
            units is re-initialised from the dense weights' statistics, a different subset per expert.
        With noise_std = reinit_fraction = 0 and no dropped token, the result computes what `model` did; in eval
        mode with eval_router "topk" and top_k < num_experts it does not (with a warning): each token's output is
        weighted by its top_k raw probabilities, which the zero router makes top_k / num_experts.
        The zero router makes every token's choice a tie (k = 1: it goes to expert 0; k > 1: as torch's topk
        breaks it): at first nearly every token goes to the same k experts, so with a capacity factor most are
        dropped until the router learns; dropless (the default) keeps them, and noise_std / reinit_fraction give the
        router a signal from the first step (identical experts give it none: their outputs are equal).
    """
    towers = (towers,) if isinstance(towers, str) else tuple(towers)  # towers="image" means that tower only
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ClipmoeError(f"towers must be a non-empty subset of {TOWERS}, got {tuple(towers)}")
    UpcycleConfig(noise_std=noise_std, reinit_fraction=reinit_fraction, seed=seed)  # checks them, as YAML's
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, every=every, last=last, blocks=blocks, router=router,
                    capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                    batch_priority=batch_priority, eval_router=eval_router, min_capacity=min_capacity, jitter=jitter,
                    shared_expert=shared_expert, k1_gate="straight_through", per_block=per_block)
    for layer in [moe, *(moe.for_block(b) for b in moe.per_block or ())]:
        if layer.eval_router == "topk" and layer.top_k < layer.num_experts:
            warnings.warn(f"eval_router='topk' with top_k={layer.top_k} < num_experts={layer.num_experts}: in eval "
                          f"mode each token's output is weighted by its top-k router probabilities (all "
                          f"{1 / layer.num_experts:g} from the zero router), so the upcycled model does not equal "
                          "its source there until the router learns", stacklevel=2)
            break
    model = _source(model, arch)  # after the settings' checks: a bad one is said before a large checkpoint loads
    cfg = model.config
    tower_cfgs = {"image": cfg.vision, "text": cfg.text}
    for t in towers:
        if tower_cfgs[t].moe is not None:
            raise ClipmoeError(f"the {t} tower already has MoE layers; upcycle a dense model")
    placed = {}
    for t, field in (("image", "vision"), ("text", "text")):
        if t in towers:
            try:  # the placement checked against this tower's depth
                placed[field] = dataclasses.replace(tower_cfgs[t], moe=moe)
            except ConfigError as e:
                hint = ("; for blocks of one tower only, upcycle the towers one at a time (towers='image', then "
                        "towers='text')" if "per_block" in str(e) and len(towers) > 1 else "")
                raise ConfigError(f"the {t} tower: {e}{hint}") from None
    new_cfg = dataclasses.replace(cfg, **placed)
    new = CLIP(new_cfg).to(**_placement(model))
    _fill(new, model, noise_std, reinit_fraction, seed)
    return new.train(model.training)


def _placement(model: CLIP) -> dict:
    """The device and, where all its parameters share one, the dtype of `model`: the upcycled model's."""
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    return {"device": params[0].device, **({"dtype": dtypes.pop()} if len(dtypes) == 1 else {})}


def load_upcycled(model: CLIP, state_dict: dict, source: str, noise_std: float = 0.0, reinit_fraction: float = 0.0,
                  seed: int = 0) -> None:
    """Fills `model`, whose config has MoE layers, from the state dict of the dense model of the same
    architecture (clipmoe or open_clip keys): what `create_model(..., pretrained=DENSE)` does for an MoE
    config. Unlike `upcycle`, the routing settings are the config's own: with top-1 and k1_gate "multiply"
    (the default) the gate scales each output, so the model starts equal to its source only with
    k1_gate "straight_through" or top_k > 1 (and no dropped token; in eval mode, not with expert choice's
    eval_router "topk" and top_k < num_experts, which weighs outputs by the raw probabilities)."""
    cfg = model.config
    dense = CLIP(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, moe=None),
                                     text=dataclasses.replace(cfg.text, moe=None)))
    load_weights(dense, state_dict, source)
    _fill(model, dense, noise_std, reinit_fraction, seed)


def _fill(new: CLIP, dense: CLIP, noise_std: float, reinit_fraction: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new.load_state_dict(_upcycled_state(dense, new, noise_std, reinit_fraction, generator))


def is_dense_state_dict(state_dict: dict) -> bool:
    """Whether a state dict (clipmoe or open_clip keys) holds no MoE layer."""
    return not any(".mlp.experts." in k or ".mlp.router." in k for k in state_dict)


def _source(model, arch: Optional[str]) -> CLIP:
    from .factory import create_model  # here: factory upcycles dense checkpoints with this module

    if isinstance(getattr(model, "module", None), CLIP):  # DistributedDataParallel(model)
        model = model.module
    if isinstance(model, CLIP):
        return model
    if isinstance(model, torch.nn.Module):
        # open_clip picks the activation by name ("-quickgelu"): follow the model, not the name given
        quick_gelu = any(type(m).__name__ == "QuickGELU" for m in model.modules())
        state, training, source = model.state_dict(), model.training, f"the {type(model).__name__} given"
        visual = getattr(getattr(model, "module", model), "visual", None)  # open_clip's image tower
        if visual is not None and type(visual).__name__ != "VisionTransformer":
            source += f" (image tower {type(visual).__name__})"
        if not arch:
            return _from_weights(state, source, quick_gelu, _heads(model)).train(training)
        dense = create_model(arch, quick_gelu=quick_gelu)
        load_weights(dense, state, source)
        return dense.train(training)
    if isinstance(model, Mapping):
        if not arch:
            return _from_weights(dict(model), "the state dict given").train(False)
        dense = create_model(arch)
        load_weights(dense, dict(model), "the state dict given")
        return dense.train(False)
    if not isinstance(model, (str, Path)):
        raise ClipmoeError(f"upcycle takes a CLIP model, an open_clip model or state dict or a checkpoint path, "
                           f"not {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        hint = (f"; {model!r} is an architecture: upcycle clipmoe.create_model({str(model)!r}, pretrained=...)"
                if canonical_name(str(model)) in list_architectures() else "")
        raise ClipmoeError(f"checkpoint not found: {path}{hint}")
    if arch:
        return create_model(arch, pretrained=str(path))
    if is_clipmoe_file(path):
        return load(path)
    # OpenAI's TorchScript archives are QuickGELU models; other files do not say
    return _from_weights(read_checkpoint(path), str(path), True if is_torchscript(path) else None)


def _heads(model: torch.nn.Module) -> Optional[tuple[int, int]]:
    """(image, text) attention heads of an open_clip model: the first attention module of each tower."""
    heads = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            heads.setdefault("image" if "visual." in name else "text", m.num_heads)  # also under DDP's module.
    return (heads["image"], heads["text"]) if len(heads) == 2 else None


def _from_weights(state: dict, source: str, quick_gelu: Optional[bool] = None,
                  num_heads: Optional[tuple[int, int]] = None) -> CLIP:
    """A dense CLIP of the architecture the weights' shapes give (`config_from_weights`), holding them."""
    if not is_dense_state_dict(state):
        raise ClipmoeError(f"{source} has MoE layers; upcycle a dense model")
    try:
        cfg = config_from_weights(state, bool(quick_gelu), num_heads)
    except ClipmoeError as e:
        # no arch= helps here: weights without a ViT CLIP's keys fit no architecture of ours
        raise ClipmoeError(f"{source}: {e}; clipmoe upcycles open_clip's ViT CLIPs "
                           "(clipmoe.list_architectures())") from None
    if quick_gelu is None:  # stacklevel: the caller of upcycle
        fix = (f"arch='{cfg.name}-quickgelu'" if f"{cfg.name}-quickgelu" in list_architectures() else
               f"upcycling clipmoe.create_model({cfg.name or 'ARCH'!r}, pretrained=..., quick_gelu=True)")
        warnings.warn(f"{source}: weights do not record their activation, so they are taken to be GELU's "
                      f"(open_clip's default); QuickGELU weights (OpenAI's, laion400m's) need {fix}", stacklevel=4)
    dense = CLIP(cfg)
    load_weights(dense, state, source)
    return dense


def _drop_upcycle(w1, b1, w2, fraction: float, generator: torch.Generator):
    """Re-initialises a random `fraction` of each expert's hidden units (columns of w1 and w2, b1) from
    the dense weights' mean and std, so experts start different but keep most of the dense knowledge."""
    E, D, F_ = w1.shape
    n = int(round(fraction * F_))
    if n == 0:
        return
    m1, s1, m2, s2 = w1.mean(), w1.std(), w2.mean(), w2.std()
    for e in range(E):  # the draws of the (E, F, D) layout before: a seed picks the same units, the same random numbers
        idx = torch.randperm(F_, generator=generator)[:n].to(w1.device)
        w1[e][:, idx] = (torch.randn(n, D, generator=generator) * s1 + m1).t().to(w1)
        b1[e][idx] = 0
        w2[e][:, idx] = (torch.randn(n, D, generator=generator) * s2 + m2).t().to(w2)


def _upcycled_state(dense: CLIP, new: CLIP, noise_std: float, reinit_fraction: float,
                    generator: torch.Generator) -> dict:
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for tower in TOWERS:
        dense_blocks, new_blocks = getattr(dense, tower).blocks, getattr(new, tower).blocks
        for i, (db, nb) in enumerate(zip(dense_blocks, new_blocks)):
            prefix = f"{tower}.blocks.{i}.mlp."
            if type(nb.mlp) is type(db.mlp):  # a block that keeps its MLP (or its existing MoE)
                state.update({prefix + k: v for k, v in db.mlp.state_dict().items()})
                continue
            E = nb.mlp.cfg.num_experts
            fc1, fc2 = db.mlp.fc1, db.mlp.fc2
            if (nb.mlp.experts.hidden, nb.mlp.experts.dim) != fc1.weight.shape:
                raise ClipmoeError(f"{tower} block {i}: experts of hidden width {nb.mlp.experts.hidden} cannot "
                                   f"copy a dense MLP of hidden width {fc1.weight.shape[0]} (set expert_mlp_ratio "
                                   "to null, or to the tower's mlp_ratio, to upcycle)")
            if nb.mlp.shared is not None:  # the shared expert starts from the dense MLP with a zero output
                state.update({prefix + "shared." + k: v for k, v in db.mlp.state_dict().items()})
                state[prefix + "shared.fc2.weight"] = torch.zeros_like(fc2.weight)
                state[prefix + "shared.fc2.bias"] = torch.zeros_like(fc2.bias)
            experts = {  # both expert matrices are (E, width, hidden); see experts.py
                "w1": fc1.weight.t().expand(E, -1, -1), "b1": fc1.bias.expand(E, -1),
                "w2": fc2.weight.expand(E, -1, -1), "b2": fc2.bias.expand(E, -1),
            }
            experts = {name: w.clone(memory_format=torch.contiguous_format) for name, w in experts.items()}
            if noise_std > 0:
                for name in ("w1", "w2"):
                    w = experts[name]  # drawn (E, hidden, width), as before the layout changed: same seed, same noise
                    noise = torch.randn(w.transpose(1, 2).shape, generator=generator, dtype=w.dtype).transpose(1, 2)
                    w += noise.to(w.device) * noise_std * w.std()
            _drop_upcycle(experts["w1"], experts["b1"], experts["w2"], reinit_fraction, generator)
            state.update({prefix + "experts." + name: w for name, w in experts.items()})
            state[prefix + "router.weight"] = torch.zeros_like(nb.mlp.router.weight)
    return state
