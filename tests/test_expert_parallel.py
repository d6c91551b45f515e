"""Expert parallelism on real gloo process groups: a layer whose experts are split over the ranks computes what
the whole layer computes on each rank's tokens, gradients included; `clipmoe train` with expert parallelism
ends where the same run without it ends."""
import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port, assert_same_run, baseline_config, run_training, variant
from torch import nn

from clipmoe.config import MoEConfig
from clipmoe.moe import MoE

D, H = 16, 24
MODES = {
    "k2_dropless": dict(num_experts=4, top_k=2, capacity_factor=None),
    "k1_capacity_bpr": dict(num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=1, batch_priority=True),
    "k2_capacity": dict(num_experts=8, top_k=2, capacity_factor=0.75, min_capacity=1),
    "expert_choice": dict(num_experts=4, top_k=1, router="expert_choice", capacity_factor=1.5),
}


def _init(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _inputs(rank: int, masked: bool = False):
    """Rank r's tokens (a different count on each rank), upstream gradient, and token mask."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 12 + 7 * rank
    x, dy = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    mask = torch.rand(n, generator=g) < 0.6
    if masked and rank == 1:
        mask[:] = False  # this rank routes nothing, yet takes part in every exchange
    return x, dy, mask if masked else None


def _loss(layer, x, dy, mask):
    y, aux = layer(x, mask)
    return (y * dy).sum() + 0.1 * aux.balance_loss + 0.01 * aux.z_loss, y


def _layer(cfg: dict) -> MoE:
    torch.manual_seed(0)
    layer = MoE(D, H, MoEConfig(**cfg), nn.GELU, tower="image", block=0).train()
    with torch.no_grad():  # biases away from zero, so that their gradients are checked through the exchange
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
    return layer


def _compare_layer(rank: int, world: int, ep_size: int, cfg: dict, masked: bool = False, bf16: bool = False):
    from clipmoe import expert_parallel as ep

    groups = ep.new_groups(ep_size)
    ref = _layer(cfg)
    model = nn.ModuleList([copy.deepcopy(ref)])
    ep.shard_experts(model, groups)
    layer = model[0]
    assert layer.experts.w1.shape[0] == cfg["num_experts"] // ep_size
    tol = dict(atol=3e-2, rtol=3e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        x, dy, mask = _inputs(rank, masked)
        x.requires_grad_()
        loss, y = _loss(layer, x, dy, mask)
        loss.backward()
        # the reference: the whole layer on every rank's tokens; an expert's gradient sums over the ranks that
        # share it (its expert-parallel group)
        group_ranks = range(rank - rank % ep_size, rank - rank % ep_size + ep_size)
        for r in group_ranks:
            xr, dyr, maskr = _inputs(r, masked)
            xr.requires_grad_()
            ref_loss, ref_y = _loss(ref, xr, dyr, maskr)
            if r == rank:
                torch.testing.assert_close(y, ref_y, **tol)
                torch.testing.assert_close(loss, ref_loss, **tol)
                ref_loss.backward(inputs=[xr, ref.router.weight, *ref.experts.parameters()])
                torch.testing.assert_close(x.grad, xr.grad, **tol)
                torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, **tol)
            else:
                ref_loss.backward(inputs=list(ref.experts.parameters()))
    rows = slice(layer.experts.first, layer.experts.first + layer.experts.w1.shape[0])
    for name, p in layer.experts.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref.experts, name).grad[rows], **tol)
    return layer, ref, groups


def _modes_rank(rank: int, port: int):
    _init(rank, 2, port)
    try:
        for name, cfg in MODES.items():
            _compare_layer(rank, 2, 2, cfg)
        _compare_layer(rank, 2, 2, MODES["k2_capacity"], masked=True)
        _compare_layer(rank, 2, 2, MODES["k2_dropless"], bf16=True)
    finally:
        dist.destroy_process_group()


def test_layer_split_over_two_ranks_equals_whole_layer():
    """Every routing mode (dropless, capacity with drops and Batch Prioritized Routing, expert choice), a rank that
    routes no token at all, and bf16 autocast: outputs and gradients (router, input, each rank's experts) equal
    the whole layer's on the same tokens."""
    mp.start_processes(_modes_rank, args=(_free_port(),), nprocs=2, start_method="spawn")


def _four_ranks(rank: int, port: int):
    """World 4, expert-parallel groups {0, 1} and {2, 3}: rank r holds what rank r +- 2 holds."""
    from clipmoe import expert_parallel as ep

    _init(rank, 4, port)
    try:
        cfg = MODES["k2_capacity"]
        layer, ref, groups = _compare_layer(rank, 4, 2, cfg)
        assert groups.edp is not None and groups.ep_rank == rank % 2
        # as DDP would: the router averaged over all ranks; the experts through reduce_expert_grads
        dist.all_reduce(layer.router.weight.grad)
        layer.router.weight.grad /= 4
        mine = {n: p.grad.clone() for n, p in layer.experts.named_parameters()}
        ep.reduce_expert_grads(layer)
        full = {n: getattr(ref.experts, n).grad.clone() for n, _ in layer.experts.named_parameters()}
        for n, g in full.items():  # each rank's reference summed its group's 2 ranks: all 4 summed twice
            dist.all_reduce(g)
            g /= 2 * 4  # the whole layer's gradient on all 4 ranks' tokens, mean over ranks
        rows = slice(layer.experts.first, layer.experts.first + cfg["num_experts"] // 2)
        for n, p in layer.experts.named_parameters():
            torch.testing.assert_close(p.grad, full[n][rows], atol=1e-6, rtol=1e-5)
            assert not torch.equal(p.grad, mine[n] / 4)  # the other group's tokens count too
        expect = torch.cat([layer.router.weight.grad.flatten(), *(g.flatten() for g in full.values())]).norm()
        max_norm = expect.item() / 3
        total = ep.clip_grad_norm_(layer, max_norm)
        torch.testing.assert_close(total, expect, atol=1e-6, rtol=1e-5)
        for n, p in layer.experts.named_parameters():
            torch.testing.assert_close(p.grad, full[n][rows] * max_norm / expect, atol=1e-6, rtol=1e-4)

        # the full state and optimizer state: whole experts on every rank, and back to this rank's share
        whole = ep.gathered(layer)
        for n, t in ref.state_dict().items():
            assert torch.equal(whole.state_dict()[n], t), n
        assert type(whole.experts).__name__ == "Experts" and whole.experts.w1.shape[0] == cfg["num_experts"]
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        opt.step()
        state = ep.full_optimizer_state(opt, layer)
        w1 = [id(p) for p in layer.parameters()].index(id(layer.experts.w1))
        assert state["state"][w1]["exp_avg"].shape[0] == cfg["num_experts"]
        back = ep.shard_optimizer_state(state, opt, layer)
        assert torch.equal(back["state"][w1]["exp_avg"], opt.state_dict()["state"][w1]["exp_avg"])
    finally:
        dist.destroy_process_group()


def test_expert_data_parallel_groups_on_four_ranks():
    """Expert-parallel size 2 on 4 ranks: each expert's gradient sums its two replicas' groups' tokens, divided by
    the world size, as DDP's mean; the clipped norm counts the experts held elsewhere; the full state and
    optimizer state come back whole."""
    mp.start_processes(_four_ranks, args=(_free_port(),), nprocs=4, start_method="spawn")


def _errors_rank(rank: int, port: int):
    from clipmoe import expert_parallel as ep
    from clipmoe.errors import ClipmoeError

    _init(rank, 2, port)
    try:
        with pytest.raises(ClipmoeError, match="must divide the number of processes"):
            ep.new_groups(3)
        groups = ep.new_groups(2)
        odd = nn.ModuleList([_layer(dict(num_experts=3, top_k=1))])
        with pytest.raises(ClipmoeError, match="3 experts cannot be split evenly"):
            ep.shard_experts(odd, groups)
        with pytest.raises(ClipmoeError, match="no MoE layer"):
            ep.shard_experts(nn.Linear(2, 2), groups)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_errors():
    mp.start_processes(_errors_rank, args=(_free_port(),), nprocs=2, start_method="spawn")


def test_expert_parallel_needs_a_process_group(tiny_shards, tmp_path):
    """Without a launcher, the layer's groups and `clipmoe train` (also under DeepSpeed) say how to launch."""
    from clipmoe import expert_parallel as ep
    from clipmoe.config import RunConfig, from_dict
    from clipmoe.errors import ClipmoeError
    from clipmoe.train import train

    with pytest.raises(ClipmoeError, match="torchrun"):
        ep.new_groups(2)
    for extra in ({}, {"deepspeed": {"zero_optimization": {"stage": 2}}}):
        cfg = variant(baseline_config(tiny_shards, tmp_path), tmp_path / "run", expert_parallel_size=2, **extra)
        with pytest.raises(ClipmoeError, match="torchrun"):
            train(from_dict(RunConfig, cfg), progress=False)
    assert not dist.is_initialized()


def test_training_with_expert_parallelism_equals_training_without(ddp_baseline, tmp_path):
    """`clipmoe train` on 2 gloo ranks with expert_parallel_size 2 (the baseline run: MoE in both towers, capacity
    drops, clipping that binds; plus activation checkpointing, whose recomputation exchanges again): the same losses
    and final weights as plain DDP, the whole model written once, the same zero-shot evaluations during training;
    resumed from its step-2 checkpoint (whole experts, whole optimizer state), the same weights bit for bit."""
    cfg, ddp, ddp_out = ddp_baseline
    sharded = variant(cfg, tmp_path / "ep", expert_parallel_size=2, save_every=2, keep_checkpoints=2,
                      grad_checkpointing=True)
    ep_runs = run_training(sharded, tmp_path / "ep_ranks")
    assert_same_run(ep_runs, ddp)  # whole experts on every rank at the end, as without expert parallelism
    assert "model" in ep_runs[0]["files"] and ep_runs[1]["files"] == []
    evals = [json.loads((out / "zeroshot.json").read_text()) for out in (ddp_out, tmp_path / "ep")]
    assert [e["step"] for e in evals[1]] == [1, 3]
    for a, b in zip(*evals):  # evaluated on a copy holding all experts
        assert a["results"][0]["metrics"] == pytest.approx(b["results"][0]["metrics"])
    validated = [json.loads((out / "validation.json").read_text()) for out in (ddp_out, tmp_path / "ep")]
    assert [v["step"] for v in validated[1]] == [1, 3] and validated[1][-1]["num_samples"] == 64
    for a, b in zip(*validated):  # held-out pairs too
        assert a.pop("skipped") == b.pop("skipped") == {} and a == pytest.approx(b)
    import clipmoe
    saved = clipmoe.load(tmp_path / "ep" / "model.safetensors")
    assert saved.state_dict()["image.blocks.0.mlp.experts.w1"].shape[0] == 4

    step2 = tmp_path / "ep" / "checkpoints" / "step_00000002"
    again = run_training(variant(sharded, tmp_path / "ep2", resume=str(step2)), tmp_path / "again_ranks")
    for r in range(2):
        for name, weight in ep_runs[r]["state"].items():
            assert torch.equal(again[r]["state"][name], weight), (r, name)

    # on one process without expert parallelism: the checkpoint's whole experts and whole optimizer state load
    # into a plain optimizer; only the data positions are new
    from clipmoe.config import RunConfig, from_dict
    from clipmoe.train import train
    alone = variant(sharded, tmp_path / "alone", resume=str(step2), expert_parallel_size=1)
    with pytest.warns(UserWarning, match=r"\(world_size 2 -> 1\): the data goes on with epoch 1"):
        result = train(from_dict(RunConfig, alone), progress=False)
    assert result.steps == 4 and [row["loss"] for row in result.history[:2]] == ep_runs[0]["losses"][:2]
    assert result.model.state_dict()["image.blocks.0.mlp.experts.w1"].shape[0] == 4
