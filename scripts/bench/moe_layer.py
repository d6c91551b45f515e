"""MoE layer benchmark: clipmoe's layer vs DeepSpeed's `deepspeed.moe.layer.MoE` vs k passes of one dense
MLP (the compute no top-k layer can avoid), forward + backward, same process, same shapes.

    python scripts/bench/moe_layer.py [--tokens 4096 16384] [--dtypes fp32 bf16 amp] [--reps 8] [--device cpu] [--parts]
        [--against OTHER_CHECKOUT/clipmoe]

Prints one row per setting with median times in ms (the implementations interleaved, inputs cycled so
that routing changes every step) and the ratios clipmoe / dense-k and DeepSpeed / clipmoe. On a GPU, where
the layer can be captured (`MoE.sync_free`: bf16, or a capacity factor in fp32), the same layer replayed as
CUDA graphs is a fourth column ("graphed"). Each step backpropagates what training does: the output's sum
plus the layer's auxiliary losses (clipmoe: 0.01 balance + 0.001 z-loss; DeepSpeed: 0.01 l_aux).

`--against` times the layer of another version of clipmoe beside this one, interleaved in the same process with
the same weights (its package directory, e.g. from `git worktree add /tmp/base HEAD~1`): on a shared machine,
where separate runs drift by more than most changes, a way to measure one. At 16,384 tokens the five layers in one
process perturbed one another (BENCHMARKS.md): there, time the changed part alone.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

from clipmoe.cli import cpu_runtime_defaults

for _key, _value in cpu_runtime_defaults().items():  # as the clipmoe command runs; before torch loads OpenMP
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from clipmoe import cuda_graphs  # noqa: E402
from clipmoe.config import MoEConfig  # noqa: E402
from clipmoe.model import Mlp  # noqa: E402
from clipmoe.moe import MoE  # noqa: E402
from clipmoe.train import cpu_bf16_matmul_is_slow  # noqa: E402

D, F_, E = 512, 2048, 8


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: dict, xs: list, reps: int, device, back_to_back: bool = False) -> dict:
    """Median ms of each step, the implementations interleaved rep by rep (so drifts of a shared machine
    hit all alike), cycling through `xs` (routing, hence per-expert counts, changes every step as in
    training). The order rotates every rep, so that each implementation follows each other one equally
    often: a step runs slower after one that leaves the caches and the allocator in another state
    (DeepSpeed's E x C dispatch tensors), and in a fixed order the layer after DeepSpeed's lost 5-7 ms at
    4,096 tokens and k = 2 to the same code run after the dense layer. Warm-up: every input once through
    every implementation. `back_to_back` (throughput, on a GPU): each rep times len(xs) steps with one
    synchronisation at the end, so the CPU may queue ahead."""
    for x in xs:
        for step in steps.values():
            step(x)
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(reps):
        batch = xs if back_to_back else [xs[i % len(xs)]]
        for name in names[i % len(names):] + names[:i % len(names)]:
            step = steps[name]
            _sync(device)
            t = time.perf_counter()
            for x in batch:
                step(x)
            _sync(device)
            times[name].append((time.perf_counter() - t) / len(batch))
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def profile_steps(steps: dict, x, device, path) -> dict:
    """One step of each implementation under torch.profiler: writes the ops/kernels table (by self time) to
    `path` and returns, per implementation, (GPU kernels launched, their summed device ms); on CPU (0, 0)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tables, summary = [], {}
    for name, step in steps.items():
        with profile(activities=acts) as prof:
            step(x)
            _sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        summary[name] = (len(kernels), sum(e.device_time for e in kernels) / 1e3)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        tables.append(f"== {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=15))
    path.write_text("\n".join(tables))
    return summary


def fwd_bwd(layer, loss_of, batched=False):
    params = list(layer.parameters())

    def step(x):
        x.grad = None
        for p in params:  # as an optimizer's zero_grad(set_to_none=True): no gradient accumulation
            p.grad = None
        loss_of(layer(x.unsqueeze(0) if batched else x)).backward()
    return step


# What training backpropagates: the output (through a sum) and, for the MoE layers, their auxiliary losses
# with the default coefficients (clipmoe: balance 0.01 and z-loss 1e-3; DeepSpeed: its balance loss l_aux,
# 0.01 as in its examples; it has no z-loss).
def dense_loss(out):
    return out[0].float().sum()


def clipmoe_loss(out):
    y, aux = out
    return y.float().sum() + 0.01 * aux.balance_loss + 1e-3 * aux.z_loss


def deepspeed_loss(out):
    y, l_aux, _ = out
    return y.float().sum() + 0.01 * l_aux


def experts_step(layer, x, loss_of=dense_loss, shared_weights=False):
    """A step of `layer.experts` alone (forward + backward) on the rows and per-expert counts the layer gave
    them for x: the part of the layer that no routing scheme can avoid. `--parts` times it beside the layer, so
    that the rest (router, routing, dispatch, combine, auxiliary terms) is the difference.

    `shared_weights`: a copy of the experts in which every expert reads expert 0's weight matrices (the same
    products, shapes and gradients written, 1/E of the weight bytes fetched): what the experts would cost if their
    E-fold weights were as cheap to fetch as the dense layer's."""
    seen = []
    hook = layer.experts.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append((args[0].shape[0], args[1].detach().clone(), dict(kwargs))),
        with_kwargs=True)
    try:
        with torch.no_grad():  # only the counts are wanted
            layer(x)
    finally:
        hook.remove()
    rows, counts_E, kwargs = seen[0]
    x_SD = torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype, requires_grad=True)
    experts = layer.experts
    if shared_weights:
        experts = copy.deepcopy(experts)
        with torch.no_grad():
            for name in ("w1", "w2"):  # stride 0 over the experts: one expert's memory
                w = getattr(experts, name)
                setattr(experts, name, nn.Parameter(w[:1].expand_as(w)))
    params = list(experts.parameters())

    def step(_):  # the same rows every time: the counts are those of one routing
        x_SD.grad = None
        for p in params:
            p.grad = None
        loss_of((experts(x_SD, counts_E, **kwargs),)).backward()
    return step


def hot_and_cold(steps: dict, x, reps: int, device, flush_mib: int = 512) -> dict:
    """Median ms of each step with cold caches (after writing a `flush_mib` MiB buffer, more than the CPU's
    caches or a GPU's L2) and hot (the same step again right after: its weights still cached), the steps
    interleaved rep by rep. Cold minus hot is what a step pays for fetching its weights (and activations)
    from memory: E experts hold E times the dense layer's weights, which the k dense passes never fetch."""
    junk = torch.zeros(flush_mib * 2 ** 18, device=device)  # float32
    times = {name: ([], []) for name in steps}
    for step in steps.values():
        step(x)
    for _ in range(reps):
        for name, step in steps.items():
            junk.add_(1.0)
            for kept in times[name]:  # cold, then hot
                _sync(device)
                t = time.perf_counter()
                step(x)
                _sync(device)
                kept.append(time.perf_counter() - t)
    return {name: tuple(statistics.median(v) * 1e3 for v in pair) for name, pair in times.items()}


def other_clipmoe(package_dir: str):
    """The `clipmoe` package at `package_dir` (another checkout's), imported as `clipmoe_against`."""
    import importlib.util
    import sys

    init = Path(package_dir) / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--against: no clipmoe package at {package_dir} (expected {init})")
    spec = importlib.util.spec_from_file_location("clipmoe_against", init, submodule_search_locations=[package_dir])
    sys.modules[spec.name] = package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    return importlib.import_module("clipmoe_against.moe"), importlib.import_module("clipmoe_against.config")


def same_weights(ours: dict, theirs: dict) -> dict:
    """Our layer's weights for another version's layer: versions before commit 8bd11d5 stored the experts' matrices
    transposed, (E, hidden, width)."""
    return {k: v.transpose(-2, -1) if v.shape != theirs[k].shape and v.ndim == 3 else v for k, v in ours.items()}


def deepspeed_layer(k: int, cf, device, dtype):
    """DeepSpeed's MoE on one process (expert-parallel size 1); None when DeepSpeed is missing."""
    try:
        import deepspeed  # noqa: F401
        from deepspeed.moe.layer import MoE as DSMoE
    except Exception as e:  # said once per row, so that a missing column is never a silent one
        print(f"# no DeepSpeed column: {type(e).__name__}: {e}")
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=0, world_size=1)
    expert = nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, D))
    drop = cf is not None
    layer = DSMoE(hidden_size=D, expert=expert, num_experts=E, ep_size=1, k=k,
                  capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, min_capacity=4,
                  drop_tokens=drop, use_rts=False)
    return layer.to(device=device, dtype=dtype).train()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16", "amp"],
                   help="fp32, bf16 (weights and inputs in bf16) or amp (fp32 weights and inputs under bf16 autocast, "
                        "as clipmoe trains); default: fp32 bf16 (fp32 only on a CPU without bf16 matmul kernels)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cfs", nargs="+", default=["1.25", "dropless"])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--inputs", type=int, default=4, help="distinct input batches cycled through")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--back-to-back", action="store_true",
                   help="time steps back to back, one synchronisation per rep (throughput rather than latency)")
    p.add_argument("--parts", action="store_true",
                   help="also time clipmoe's experts alone on the layer's own counts (the rest is routing), and "
                        "it and the dense layer with cold and hot caches")
    p.add_argument("--profile", metavar="DIR", help="also profile one step per row: tables to DIR, kernel counts")
    p.add_argument("--against", metavar="DIR", help="also time the MoE layer of the clipmoe package in DIR (another "
                                                    "version), interleaved with this one, with the same weights")
    args = p.parse_args()
    device = torch.device(args.device)
    against = other_clipmoe(args.against) if args.against else None
    no_bf16 = args.dtypes is None and device.type == "cpu" and cpu_bf16_matmul_is_slow()
    if args.dtypes is None:  # without bf16 kernels one dense bf16 step takes ~100 s at 4,096 tokens
        args.dtypes = ["fp32"] if no_bf16 else ["fp32", "bf16"]
    print(f"# {date.today()} {platform.node()} {device} torch {torch.__version__} threads {torch.get_num_threads()}")
    # the allocator moves the CPU numbers (page faults of fresh temporaries; see BENCHMARKS.md)
    malloc = os.environ.get("LD_PRELOAD") or os.environ.get("GLIBC_TUNABLES") or "glibc defaults"
    print(f"# malloc: {malloc}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; "
          + ("back to back (throughput)" if args.back_to_back else "one step per timing"))
    if no_bf16:
        print("# no bf16 rows: this CPU has no bf16 matmul kernels (AVX-512 or AMX); --dtypes bf16 runs them")
    print(f"{'tokens':>6} {'dtype':>5} {'k':>2} {'cf':>8} | {'dense xk':>9} {'clipmoe':>9} {'deepspeed':>9} "
          f"{'graphed':>9} | {'ours/dense':>10} {'ds/ours':>8} {'ds/graphed':>10}")
    for tokens in args.tokens:
        for dt in args.dtypes:
            for k in args.ks:
                for cf_s in args.cfs:
                    # amp: fp32 weights and inputs under bf16 autocast, as clipmoe trains (`precision: bf16`)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dt == "amp"):
                        bench_row(args, device, tokens, dt, k, cf_s, against)


def bench_row(args, device, tokens: int, dt: str, k: int, cf_s: str, against) -> None:
    """Times and prints one row: dense x k, clipmoe, DeepSpeed (and what the flags add) at one setting."""
    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    cf = None if cf_s == "dropless" else float(cf_s)
    torch.manual_seed(0)
    xs = [torch.randn(tokens, D, device=device, dtype=dtype, requires_grad=True) for _ in range(args.inputs)]
    dense = Mlp(D, F_, nn.GELU).to(device=device, dtype=dtype)
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, eval_capacity_factor=cf)
    ours = MoE(D, F_, cfg, nn.GELU).to(device=device, dtype=dtype).train()
    steps = {"dense": fwd_bwd(dense, dense_loss), "ours": fwd_bwd(ours, clipmoe_loss)}
    ds = deepspeed_layer(k, cf, device, dtype)
    if ds is not None:
        steps["ds"] = fwd_bwd(ds, deepspeed_loss, batched=True)
    if args.parts:
        steps["experts"] = experts_step(ours, xs[0])
        if device.type == "cpu":  # the CPU's question: what fetching E experts' weights costs
            steps["shared"] = experts_step(ours, xs[0], shared_weights=True)
    if against is not None:
        other_moe, other_config = against
        theirs = other_moe.MoE(D, F_, other_config.MoEConfig(
            num_experts=E, top_k=k, capacity_factor=cf, eval_capacity_factor=cf), nn.GELU)
        theirs.load_state_dict(same_weights(ours.state_dict(), theirs.state_dict()))
        steps["against"] = fwd_bwd(theirs.to(device=device, dtype=dtype).train(), clipmoe_loss)
    if device.type == "cuda" and dt != "amp" and ours.sync_free(xs[0]):  # the same layer, CUDA-graphed
        graphed = cuda_graphs.capture(copy.deepcopy(ours), torch.randn_like(xs[0]).requires_grad_())
        steps["graphed"] = fwd_bwd(graphed, clipmoe_loss)
    t = measure(steps, xs, args.reps, device, args.back_to_back)
    nan = float("nan")
    t_dense, t_ours, t_ds, t_g = k * t["dense"], t["ours"], t.get("ds", nan), t.get("graphed", nan)
    print(f"{tokens:>6} {dt:>5} {k:>2} {cf_s:>8} | {t_dense:>9.1f} {t_ours:>9.1f} {t_ds:>9.1f} "
          f"{t_g:>9.1f} | {t_ours / t_dense:>10.2f} {t_ds / t_ours:>8.2f} {t_ds / t_g:>10.2f}", flush=True)
    if against is not None:
        t_a = t["against"]
        print(f"#   against {args.against}: {t_a:.1f} ms ({t_a / t_dense:.2f} x dense xk); "
              f"this one {t_ours - t_a:+.2f} ms", flush=True)
    if args.parts:
        t_e, rest = t["experts"], t_ours - t["experts"]
        print(f"#   parts: experts alone {t_e:.1f} ms ({t_e / t_dense:.2f} x dense xk), "
              f"the rest of the layer {rest:.1f} ms ({rest / t_dense:.2f})", flush=True)
        if "shared" in t:
            t_s = t["shared"]
            print(f"#   experts reading one expert's weights {t_s:.1f} ms ({t_s / t_dense:.2f} x dense "
                  f"xk): fetching the E experts' weights costs {t_e - t_s:.1f} ms", flush=True)
        hc = hot_and_cold({"dense": steps["dense"], "experts": steps["experts"]}, xs[0], args.reps, device)
        print("#   caches (cold, hot ms; dense once): " + ", ".join(
            f"{name} {cold:.1f}, {hot:.1f}" for name, (cold, hot) in hc.items()), flush=True)
    if args.profile:
        out = Path(args.profile) / f"{tokens}_{dt}_k{k}_{cf_s}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        prof = profile_steps(steps, xs[0], device, out)
        if device.type == "cuda":
            print("#   kernels, device ms: " + ", ".join(
                f"{name} {n} {ms:.2f}" for name, (n, ms) in prof.items()), flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:  # DeepSpeed's layer needed a (one-process) group
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
