"""Expert-parallel MoE layer benchmark: clipmoe's layer with its experts split over 2 ranks against DeepSpeed's
`deepspeed.moe.layer.MoE` with ep_size 2, on the same shapes, forward + backward, and against clipmoe's layer
holding all experts on every rank (no exchange: the cost of the all-to-alls and of the smaller expert groups).

    python scripts/bench/expert_parallel.py [--ranks 2] [--tokens 4096] [--reps 6] [--threads 1]

Starts its own ranks (gloo on CPU; a GPU run needs one GPU per rank, NCCL refusing two ranks on one device).
Rank 0 prints one row per setting: median ms over reps (the implementations interleaved, a barrier before
each timed step, inputs cycled so that routing changes) and the ratio DeepSpeed / clipmoe.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from datetime import date

from clipmoe.cli import cpu_runtime_defaults

for _key, _value in cpu_runtime_defaults().items():  # as the clipmoe command runs; before torch loads OpenMP
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from clipmoe import expert_parallel as ep  # noqa: E402
from clipmoe.config import MoEConfig  # noqa: E402
from clipmoe.moe import MoE  # noqa: E402

D, F_, E = 512, 2048, 8


def _rank(rank: int, args, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.ranks))
    torch.set_num_threads(args.threads)
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    groups = ep.new_groups(args.ranks)
    if rank == 0:
        print(f"# {date.today()} {platform.node()} cpu torch {torch.__version__} deepspeed {deepspeed.__version__}"
              f" ranks {args.ranks} x {args.threads} threads, {args.tokens} tokens per rank, fp32")
        print(f"{'k':>2} {'cf':>8} | {'all experts':>11} {'clipmoe ep':>10} {'deepspeed ep':>12} | {'ds/ours':>7}",
              flush=True)
    for k in args.ks:
        for cf_s in args.cfs:
            cf = None if cf_s == "dropless" else float(cf_s)
            torch.manual_seed(0)
            cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf)
            whole = MoE(D, F_, cfg, nn.GELU).train()
            ours = nn.ModuleList([MoE(D, F_, cfg, nn.GELU).train()])
            ep.shard_experts(ours, groups)
            expert = nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, D))
            ds = DSMoE(hidden_size=D, expert=expert, num_experts=E, ep_size=args.ranks, k=k,
                       capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, min_capacity=4,
                       drop_tokens=cf is not None, use_rts=False).train()
            ds.set_deepspeed_parallelism()  # its process groups, which deepspeed.initialize would set up
            g = torch.Generator().manual_seed(rank)
            xs = [torch.randn(args.tokens, D, generator=g).requires_grad_() for _ in range(3)]
            steps = {
                "whole": lambda x: _backward(whole(x), x, whole),
                "ours": lambda x: _backward(ours[0](x), x, ours),
                "ds": lambda x: _backward(ds(x.unsqueeze(0)), x, ds),
            }
            times = {name: [] for name in steps}
            for i in range(args.reps + 1):  # the first round warms up
                for name, step in steps.items():
                    dist.barrier()
                    t = time.perf_counter()
                    step(xs[i % len(xs)])
                    if i:
                        times[name].append(time.perf_counter() - t)
            if rank == 0:
                ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
                print(f"{k:>2} {cf_s:>8} | {ms['whole']:>11.1f} {ms['ours']:>10.1f} {ms['ds']:>12.1f} | "
                      f"{ms['ds'] / ms['ours']:>7.2f}", flush=True)
    dist.destroy_process_group()


def _backward(out, x, layer):
    """What training backpropagates: the output's sum and the auxiliary losses (clipmoe: 0.01 balance + 0.001
    z-loss; DeepSpeed: 0.01 l_aux)."""
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    if isinstance(out[1], torch.Tensor):  # DeepSpeed: (y, l_aux, counts)
        loss = out[0].sum() + 0.01 * out[1]
    else:
        loss = out[0].sum() + 0.01 * out[1].balance_loss + 1e-3 * out[1].z_loss
    loss.backward()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cfs", nargs="+", default=["1.25", "dropless"])
    p.add_argument("--reps", type=int, default=6)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(args, port), nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
