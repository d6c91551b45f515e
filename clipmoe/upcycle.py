"""Sparse upcycling (Komatsuzaki et al. 2022): a dense CLIP becomes an MoE CLIP whose experts are copies
of the dense MLPs and whose routers start at zero, so that, with renormalised top-k (or a
straight-through gate for k = 1) and no dropped tokens, it computes what the dense model computed."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .config import MoEConfig
from .errors import ClipmoeError
from .model import CLIP

TOWERS = ("image", "text")


def upcycle(
    model: Union[CLIP, str, Path],
    num_experts: int = 8,
    top_k: int = 2,
    every: int = 2,
    towers: Sequence[str] = TOWERS,
    *,
    last: Optional[int] = None,
    blocks: Optional[list[int]] = None,
    capacity_factor: Optional[float] = None,
    eval_capacity_factor: Optional[float] = None,
    min_capacity: int = 4,
    noise_std: float = 0.0,
    seed: int = 0,
) -> CLIP:
    """Returns a new MoE model upcycled from a dense one (`model` itself is not changed).

    Args:
        model: a CLIP model or the path of a `clipmoe.save` file.
        num_experts, top_k: experts per MoE layer and experts per token.
        every / last / blocks: placement, per tower (every n-th block, the last n, or explicit indices).
        towers: which towers get MoE layers ("image", "text").
        capacity_factor, eval_capacity_factor: None (default) is dropless, which keeps the model equal
            to its source; a float drops tokens past capacity.
        noise_std: relative std of Gaussian noise added to each expert copy to break their symmetry
            (0 keeps the upcycled model exactly equal to the dense one).
    """
    if isinstance(model, (str, Path)):
        from .checkpoint import load

        model = load(model)
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ClipmoeError(f"towers must be a non-empty subset of {TOWERS}, got {tuple(towers)}")
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, every=every, last=last, blocks=blocks,
                    capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                    min_capacity=min_capacity, k1_gate="straight_through")
    cfg = model.config
    tower_cfgs = {"image": cfg.vision, "text": cfg.text}
    for t in towers:
        if tower_cfgs[t].moe is not None:
            raise ClipmoeError(f"the {t} tower already has MoE layers; upcycle a dense model")
    new_cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, moe=moe) if "image" in towers else cfg.vision,
        text=dataclasses.replace(cfg.text, moe=moe) if "text" in towers else cfg.text,
    )
    new = CLIP(new_cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new.load_state_dict(_upcycled_state(model, new, noise_std, generator))
    return new.train(model.training)


def _upcycled_state(dense: CLIP, new: CLIP, noise_std: float, generator: torch.Generator) -> dict:
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
            experts = {  # nn.Linear stores (out, in); experts store (E, in, out)
                "w1": fc1.weight.t().expand(E, -1, -1), "b1": fc1.bias.expand(E, -1),
                "w2": fc2.weight.t().expand(E, -1, -1), "b2": fc2.bias.expand(E, -1),
            }
            for name, w in experts.items():
                w = w.clone()
                if noise_std > 0 and name.startswith("w"):
                    noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
                    w = w + noise.to(w.device) * noise_std * w.std()
                state[prefix + "experts." + name] = w
            state[prefix + "router.weight"] = torch.zeros_like(nb.mlp.router.weight)
    return state
