"""The contrastive losses across 2 real gloo ranks equal the full-batch losses, gradients included; `clipmoe
train` under DDP on 2 ranks."""
import math
import os
import signal
import socket
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipmoe.loss import clip_loss, sigmoid_loss

WORLD, B, D = 2, 4, 8


def _full_batch(world: int = WORLD):
    g = torch.Generator().manual_seed(0)
    return torch.randn(world * B, D, generator=g), torch.randn(world * B, D, generator=g)


def _loss(kind: str, img, txt):
    if kind.startswith("sigmoid"):
        return sigmoid_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0), torch.tensor(-5.0),
                            dist_impl="bidir" if kind == "sigmoid-bidir" else "gather")
    # "softmax-global": every rank scores the whole batch (local_loss false), whose gradients, summed back over the
    # ranks by the gather, are the same
    return clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0),
                     local_loss=kind != "softmax-global", gather_with_grad=True)


def _rank_main(rank: int, port: int, kind: str, out_dir: str, world: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt = _full_batch(world)
        img = img[rank * B:(rank + 1) * B].clone().requires_grad_()
        txt = txt[rank * B:(rank + 1) * B].clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning here would repeat at every training step
            loss = _loss(kind, img, txt)
            loss.backward()
        torch.save({"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind, world", [("softmax", 2), ("softmax", 4), ("softmax-global", 2), ("sigmoid", 2),
                                         ("sigmoid-bidir", 2), ("sigmoid-bidir", 4)])
def test_gathered_loss_equals_full_batch(tmp_path, kind, world):
    """Each rank's loss on its rows of the batch (the other ranks' features gathered with gradients, or for the
    sigmoid loss's "bidir" exchanged point to point: with 2 ranks from the one other, with 4 from both sides and
    then from the opposite rank): the rank mean and DDP's mean of the gradients are the full batch's."""
    img, txt = _full_batch(world)
    img.requires_grad_()
    txt.requires_grad_()
    full = _loss(kind, img, txt)
    full.backward()
    mp.start_processes(_rank_main, args=(_free_port(), kind, str(tmp_path), world), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # DDP averages over ranks: the rank-mean loss and rank-mean gradients are the full-batch ones
    assert torch.allclose(sum(r["loss"] for r in ranks) / world, full, atol=1e-6)
    for r in range(world):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(ranks[r]["img_grad"] / world, img.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ranks[r]["txt_grad"] / world, txt.grad[rows], atol=1e-6, rtol=1e-5)


def _train_rank(rank: int, port: int, cfg: dict, out_dir: str, world: int = WORLD, stop=None):
    """One rank of `clipmoe train` as torchrun starts it (the process group from the environment), or for one
    process as a plain `clipmoe train` runs (no launcher's environment); what it ends with goes to
    OUT_DIR/rank{rank}.pt. `stop` = (what, rank, n): that rank sends itself signal `what` in its n-th forward, or
    with what = "data" its loader fails at its n-th batch; the result then also holds what it stopped with. With
    what = "slow" its first validation and its first write of a checkpoint's state.pt take n seconds more, and the
    process group's timeout is n / 2; with what = "full_disk" its writes of its checkpoint part fail."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        if stop is not None and stop[0] == "slow":  # the group joined here, its timeout half the slow work's
            dist.init_process_group("gloo")
            dist.set_timeout(timedelta(seconds=stop[2] / 2))
    else:
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    torch.set_num_threads(1)
    from clipmoe.config import RunConfig, from_dict
    from clipmoe.train import train

    if stop is not None and stop[1] == rank:
        _stop_at(*stop)
    import loaders
    from clipmoe.train import TrainingInterrupted

    stopped = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = train(from_dict(RunConfig, cfg), progress=False)
            except TrainingInterrupted as e:
                result, stopped = e.result, f"signal {e.signum}: {e}"
            except loaders.DataError as e:
                result, stopped = None, f"DataError: {e}"
        torch.save({"state": result and result.model.state_dict(), "stats": result and result.data_stats,
                    "files": sorted(result.files) if result else [], "steps": result and result.steps,
                    "losses": [row["loss"] for row in result.history] if result else [], "stopped": stopped,
                    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}, f"{out_dir}/rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop_at(what, rank: int, n: int) -> None:
    import clipmoe.train as train_module

    if what == "full_disk":
        import errno

        save = torch.save

        def failing_save(obj, path, *args, **kwargs):
            if "checkpoints" in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return save(obj, path, *args, **kwargs)
        train_module.resume.torch.save = failing_save
    elif what == "slow":
        def slowed(work, first=lambda *args: True):
            calls = []

            def slow(*args, **kwargs):
                if first(*args) and not calls:
                    calls.append(None)
                    time.sleep(n)
                return work(*args, **kwargs)
            return slow
        train_module._validate = slowed(train_module._validate)
        train_module.resume.torch.save = slowed(torch.save, lambda obj, path, *rest: str(path).endswith("state.pt"))
    elif what == "data":
        batches = train_module._batches

        def failing(*args, **kwargs):
            for i, batch in enumerate(batches(*args, **kwargs), 1):
                if i == n:
                    raise train_module.loaders.DataError(f"corrupt_image in shard of rank {rank} (a test's)")
                yield batch
        train_module._batches = failing
    else:
        loss, calls = train_module.total_loss, []

        def signalling(*args, **kwargs):
            calls.append(None)
            if len(calls) == n:
                os.kill(os.getpid(), what)
            return loss(*args, **kwargs)
        train_module.total_loss = signalling


def run_training(cfg: dict, out_dir, world: int = WORLD, stop=None, timeout: float = 300) -> list[dict]:
    """`clipmoe train` with `cfg` on `world` gloo ranks; what each rank ended with (see `_train_rank`). Ranks that
    are still running after `timeout` seconds (waiting for each other) are killed and fail the test."""
    out_dir.mkdir()
    ctx = mp.start_processes(_train_rank, args=(_free_port(), cfg, str(out_dir), world, stop), nprocs=world,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout} s (a collective that some rank never joined?)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def baseline_config(tiny_shards, tmp_path, **train) -> dict:
    """The run that the expert-parallel and DeepSpeed tests compare with plain DDP: MoE in both towers (capacity
    drops in the text tower; image block 1 with 2 experts and top-1, block 0 with 4 and top-2), clipping that
    binds, the logit scale at its clamp (a step that raises it is clamped back), zero-shot evaluation on a folder
    benchmark every 2 steps; output in TMP_PATH/run."""
    from PIL import Image

    root = tmp_path / "colours"
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (16, 16), tuple(c + 9 * i for c in rgb)).save(root / name / f"{i}.png")
    return {
        "model": {"arch": "clipmoe-micro", "overrides": {
            "init_logit_scale": math.log(100),
            # block 1: a layer of its own size and routing (per_block), whose experts split differently over ranks
            "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 1, "per_block": {1: {"num_experts": 2,
                                                                                             "top_k": 1}}}},
            "text": {"moe": {"num_experts": 4, "top_k": 1, "every": 2, "capacity_factor": 1.0}}}},
        "data": {"train": tiny_shards["train"], "eval": tiny_shards["eval"], "batch_size": 16},
        "loss": {"balance_coef": 0.01, "z_coef": 0.001},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "grad_clip": 0.5},
        "train": {"steps": 4, "log_every": 1, "out_dir": str(tmp_path / "run"), "device": "cpu", **train},
        "eval": {"zeroshot": ["folder"], "data_root": str(root), "every": 2},
    }


def variant(cfg: dict, out_dir, **train) -> dict:
    """`cfg` writing to `out_dir`, with these train: fields."""
    return {**cfg, "train": {**cfg["train"], "out_dir": str(out_dir), **train}}


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    """Two runs' ranks ended with the same losses and weights, up to float reassociation."""
    import pytest

    for r in range(len(a)):
        assert a[r]["losses"] == pytest.approx(b[r]["losses"], rel=1e-5, abs=1e-6)
        assert a[r]["state"].keys() == b[r]["state"].keys()
        for name, weight in b[r]["state"].items():
            torch.testing.assert_close(a[r]["state"][name], weight, atol=2e-5, rtol=1e-4, msg=name)


def test_ddp_training_on_two_ranks(tiny_shards, tmp_path):
    """DDP over 2 gloo ranks with MoE layers in both towers (capacity drops in the text tower, router jitter) and
    activation checkpointing: the ranks read different shards, end with the same weights, and only rank 0
    writes; resumed from its step-2 checkpoint, the run ends with the same weights bit for bit."""
    run = tmp_path / "run"
    cfg = {
        "model": {"arch": "clipmoe-micro", "overrides": {
            "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 1, "jitter": 0.1}},
            "text": {"moe": {"num_experts": 4, "top_k": 1, "every": 2, "capacity_factor": 1.0}}}},
        "data": {"train": tiny_shards["train"], "batch_size": 16},
        "loss": {"balance_coef": 0.01, "z_coef": 0.001},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"steps": 4, "log_every": 1, "out_dir": str(run), "device": "cpu", "grad_checkpointing": True,
                  "save_every": 2, "keep_checkpoints": 2},
    }
    mp.start_processes(_train_rank, args=(_free_port(), cfg, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name  # DDP kept the replicas equal
    import clipmoe
    init = clipmoe.create_model(clipmoe.get_model_config("clipmoe-micro", cfg["model"]["overrides"]))
    assert not torch.equal(init.image.patch_embed.weight, ranks[0]["state"]["image.patch_embed.weight"])
    assert [r["stats"]["samples"] for r in ranks] == [4 * 16, 4 * 16]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank's own half of the global batch
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
    assert "model" in ranks[0]["files"] and ranks[1]["files"] == []
    assert (run / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    step2 = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step2.iterdir()) == ["rank0.pt", "rank1.pt", "state.pt"]

    resumed = {**cfg, "train": {**cfg["train"], "out_dir": str(tmp_path / "resumed"), "resume": str(step2)}}
    (tmp_path / "again").mkdir()
    mp.start_processes(_train_rank, args=(_free_port(), resumed, str(tmp_path / "again")), nprocs=WORLD,
                       start_method="spawn")
    again = [torch.load(tmp_path / "again" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        for name, weight in ranks[r]["state"].items():
            assert torch.equal(weight, again[r]["state"][name]), (r, name)
        # the log before the resume is rank 0's (the checkpoint's), after it each rank's own
        assert again[r]["losses"] == ranks[0]["losses"][:2] + ranks[r]["losses"][2:]
        assert again[r]["stats"] == ranks[r]["stats"]

    # on one rank (a node lost): all but the data positions, which go on with epoch 1 (the 2 ranks read 64 of
    # epoch 0's 256 samples); rank 0's counts go on
    from clipmoe.config import RunConfig, from_dict
    from clipmoe.train import train
    alone = {**cfg, "data": {**cfg["data"], "batch_size": 32},
             "train": {**cfg["train"], "out_dir": str(tmp_path / "alone"), "resume": str(step2)}}
    with pytest.warns(UserWarning, match=r"\(world_size 2 -> 1\): the data goes on with epoch 1, which no rank"):
        result = train(from_dict(RunConfig, alone), progress=False)
    assert result.steps == 4 and [row["loss"] for row in result.history[:2]] == ranks[0]["losses"][:2]
    assert result.data_stats["samples"] == 2 * 16 + 2 * 32
    assert not any(torch.equal(result.model.state_dict()[name], w) for name, w in ranks[0]["state"].items()
                   if name.endswith("patch_embed.weight"))  # other data, other steps


def test_resume_on_more_ranks(tiny_shards, tmp_path):
    """A one-process checkpoint resumed on 2 ranks (nodes added): both take up the model, optimizer, schedule and
    step; rank 1, which has no saved data position, reads its share of the fresh epoch; one warning, on rank 0."""
    from clipmoe.config import RunConfig, from_dict
    from clipmoe.train import train

    cfg = {"model": {"arch": "clipmoe-micro", "overrides": {"vision": {"moe": {"num_experts": 4, "top_k": 2}}}},
           "data": {"train": tiny_shards["train"], "batch_size": 32},
           "optim": {"lr": 2e-3, "warmup_steps": 1},
           "train": {"steps": 2, "log_every": 1, "out_dir": str(tmp_path / "one"), "device": "cpu",
                     "save_every": 2}}
    first = train(from_dict(RunConfig, cfg), progress=False)
    step2 = tmp_path / "one" / "checkpoints" / "step_00000002"
    more = {**cfg, "data": {**cfg["data"], "batch_size": 16},
            "train": {**cfg["train"], "steps": 4, "out_dir": str(tmp_path / "two"), "resume": str(step2)}}
    ranks = run_training(more, tmp_path / "ranks")
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name
    for r in range(WORLD):
        assert ranks[r]["steps"] == 4 and ranks[r]["losses"][:2] == [row["loss"] for row in first.history]
    said = [w for w in ranks[0]["warnings"] if "train.resume" in w]
    assert len(said) == 1 and "(world_size 1 -> 2): the data goes on with epoch 1" in said[0]
    assert not any("train.resume" in w for w in ranks[1]["warnings"])
    assert [r["stats"]["samples"] for r in ranks] == [2 * 32 + 2 * 16, 2 * 16]


@pytest.mark.parametrize("what, extra", [(signal.SIGTERM, {}), ("data", {}),
                                         (signal.SIGINT, {"expert_parallel_size": 2}),
                                         (signal.SIGTERM, {"deepspeed": {"zero_optimization": {"stage": 2}}})],
                         ids=["SIGTERM", "data_error", "SIGINT_expert_parallel", "SIGTERM_deepspeed_zero2"])
def test_ranks_stop_together_and_the_checkpoint_resumes_exactly(tiny_shards, tmp_path, what, extra):
    """One rank alone gets SIGTERM (or Ctrl-C, here under expert parallelism; or SIGTERM under DeepSpeed's ZeRO 2,
    whose engine writes its part of the checkpoint) in its 3rd step, or its data fails at
    its 4th batch: both ranks stop at the 4th step's start (none waits in a collective for the other), write the 3
    steps and a checkpoint of step 3 together, and say why; resumed from it, the run ends with the weights of the
    run never stopped, bit for bit."""
    cfg = baseline_config(tiny_shards, tmp_path, save_every=2, keep_checkpoints=3, **extra)
    cfg["eval"] = {}
    full = run_training(variant(cfg, tmp_path / "full"), tmp_path / "full_ranks")
    n = 4 if what == "data" else 3
    stopped = run_training(cfg, tmp_path / "stopped_ranks", stop=(what, 1, n), timeout=120)
    assert [r["steps"] for r in stopped] == [3, 3] or what == "data"
    import clipmoe
    assert clipmoe.load(tmp_path / "run" / "model.safetensors").state_dict().keys() == full[0]["state"].keys()
    if what == "data":  # the failing rank's own error; the other names it
        assert "corrupt_image in shard of rank 1" in stopped[1]["stopped"]
        assert "the training data of rank 1 stopped the run" in stopped[0]["stopped"]
        assert all("training stopped after 3 of 4 steps" in r["stopped"] for r in stopped)
    else:
        how = "terminated (SIGTERM)" if what == signal.SIGTERM else "interrupted"
        assert [r["stopped"].split(" after")[0] for r in stopped] == [f"signal {int(what)}: {how}"] * 2
        assert "model" in stopped[0]["files"] and "checkpoint" in stopped[0]["files"]
    step3 = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert {"rank0.pt", "rank1.pt", "state.pt"} | ({"deepspeed"} if "deepspeed" in extra else set()) <= {
        p.name for p in step3.iterdir()}  # (DeepSpeed adds its zero_to_fp32.py scripts)
    again = run_training(variant(cfg, tmp_path / "again", resume=str(step3)), tmp_path / "again_ranks")
    for r in range(WORLD):
        for name, weight in full[r]["state"].items():
            assert torch.equal(weight, again[r]["state"][name]), (r, name)


@pytest.mark.slow  # 20-30 s: it waits out timeouts / starts two training processes
def test_other_ranks_wait_out_rank_0_longer_than_the_group_timeout(tiny_shards, tmp_path):
    """Rank 0 evaluates and writes checkpoints alone; the others wait in a gloo group with a timeout of its own
    (train.wait_minutes), not in the next step's collectives or the default group's barrier, whose timeouts
    (torch's 30 minutes for gloo, 10 for NCCL) would end the run. Here the process group's timeout is 5 s, and
    the first evaluation and the first checkpoint write take 10 s more."""
    cfg = baseline_config(tiny_shards, tmp_path, save_every=2)
    ranks = run_training(cfg, tmp_path / "out", stop=("slow", 0, 10))
    assert [r["steps"] for r in ranks] == [4, 4] and [r["stopped"] for r in ranks] == [None, None]
    assert "validation" in ranks[0]["files"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000004"]


def test_a_checkpoint_one_rank_cannot_write_is_left_by_all(tiny_shards, tmp_path):
    """Rank 1's disk is full: no rank finishes the checkpoint (it would lack rank 1's part), each says why in a
    warning, and training goes on to its end on both."""
    cfg = baseline_config(tiny_shards, tmp_path, save_every=2)
    cfg["eval"], cfg["data"] = {}, {**cfg["data"], "eval": None}
    ranks = run_training(cfg, tmp_path / "out", stop=("full_disk", 1, 0))
    assert [r["steps"] for r in ranks] == [4, 4] and [r["stopped"] for r in ranks] == [None, None]
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == [] and "checkpoint" not in ranks[0]["files"]
    said = [[w for w in r["warnings"] if "not written" in w] for r in ranks]
    assert len(said[0]) == 2 and all("another rank failed to write its part" in w for w in said[0]), said
    assert len(said[1]) == 2 and all("(rank 1: No space left on device; " in w for w in said[1]), said


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_ddp_with_a_logit_bias_and_moe_layers(tiny_shards, tmp_path, kind):
    """A model with SigLIP's logit bias under DDP with MoE layers (find_unused_parameters): the sigmoid loss trains
    the bias like every other parameter (it once was taken for unused, and its gradient then failed the backward);
    the softmax loss, which does not read it, leaves it as it was (DDP once waited for its gradient)."""
    cfg = baseline_config(tiny_shards, tmp_path, steps=3)
    cfg["model"]["overrides"].update(init_logit_bias=-10.0, init_logit_scale=math.log(10))
    cfg["loss"]["kind"], cfg["eval"] = kind, {}
    ranks = run_training(cfg, tmp_path / "ranks", timeout=120)
    bias = [r["state"]["logit_bias"] for r in ranks]
    assert torch.equal(bias[0], bias[1]) and (bias[0].item() != -10.0) == (kind == "sigmoid")
    assert all(math.isfinite(x) for r in ranks for x in r["losses"]) and len(ranks[0]["losses"]) == 3


def test_torchrun_shutdown_stops_every_rank_with_a_checkpoint(tiny_shards, tmp_path):
    """SIGTERM to torchrun (as SLURM or a scheduler stops a job): torchrun sends it on to each rank's process group,
    loader workers included (they leave it to their rank, which ends them); the ranks stop together at the next
    step and write the steps done and a checkpoint of them (resumed exactly:
    test_ranks_stop_together_and_the_checkpoint_resumes_exactly), and end on their own, before torchrun's 30 s
    grace runs out."""
    import re
    import subprocess
    import sys

    import yaml

    cfg = baseline_config(tiny_shards, tmp_path, steps=100_000, save_every=100_000)
    cfg["data"].update(num_workers=1, resampled=True, samples_per_epoch=10_000)
    cfg["eval"] = {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "clipmoe.cli", "train", str(tmp_path / "c.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, env=env)
    try:
        log, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 240
        while not (log.exists() and log.read_text().count("\n") >= 3) and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)  # torchrun itself; it signals the ranks
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    said = re.search(r"clipmoe train: terminated \(SIGTERM\) after (\d+) of 100000 steps; its model: \S+; "
                     r"to continue: --resume (\S+)", err)
    assert said and "Unable to shutdown" not in err, err[-3000:]  # the ranks ended on their own (no SIGKILL)
    assert err.count("Traceback") == err.count("SignalException: Process"), err[-3000:]  # torchrun's own only
    step = tmp_path / said[2]
    assert step.name == f"step_{int(said[1]):08d}"
    assert sorted(p.name for p in step.iterdir()) == ["rank0.pt", "rank1.pt", "state.pt"]


@pytest.mark.slow
def test_launch_script_runs_the_ranks_and_a_resubmitted_job_continues(tiny_shards, tmp_path):
    """scripts/launch.sh as a job script calls it: NPROC_PER_NODE ranks on this node (CPU: gloo); run again with
    more steps (a resubmitted job), it continues from the run's newest checkpoint instead of starting over."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    cfg = baseline_config(tiny_shards, tmp_path, steps=2, save_every=2)
    cfg["eval"] = {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    script = Path(__file__).resolve().parents[1] / "scripts" / "launch.sh"
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "CLIPMOE_VENV": sys.prefix}

    def launch(*args):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=300,
                              env={**env, "MASTER_PORT": str(_free_port())}, cwd=tmp_path)

    r = launch("c.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    r = launch("c.yaml", "--set", "train.steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # steps 2 and 3 trained on from the checkpoint; 0 and 1 not again
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]
    r = launch("missing.yaml")
    assert r.returncode == 2 and r.stderr.startswith("usage: bash scripts/launch.sh CONFIG.yaml"), r.stderr


@pytest.mark.slow  # ~20 s: two 2-rank runs
def test_accumulation_on_two_ranks_equals_the_whole_batch(tiny_shards, tmp_path):
    """DDP on 2 gloo ranks, 2 batches of 8 a step (each rank's features of both, gathered across ranks, in each
    pass; DDP's all-reduce held back to the last): the losses and weights of batches of 16."""
    cfg = {
        "model": {"arch": "clipmoe-micro", "overrides": {
            "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 1, "capacity_factor": None}}}},
        "data": {"train": tiny_shards["train"], "batch_size": 16},
        "loss": {"balance_coef": 0.0, "z_coef": 0.0},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"steps": 3, "log_every": 1, "out_dir": str(tmp_path / "whole"), "device": "cpu"},
    }
    whole = run_training(cfg, tmp_path / "whole_ranks")
    halves = run_training({**cfg, "data": {**cfg["data"], "batch_size": 8},
                           "train": {**cfg["train"], "out_dir": str(tmp_path / "halves"), "accum_freq": 2}},
                          tmp_path / "halves_ranks")
    assert_same_run(halves, whole)
    assert [r["stats"]["samples"] for r in halves] == [3 * 16, 3 * 16]
