"""`clipmoe train` under DeepSpeed's engine (ZeRO 0-2) on real gloo ranks: the same run as plain DDP, resumed bit
for bit from its checkpoints; the DeepSpeed config checked against clipmoe's."""
import math
import warnings

import pytest
import torch
from test_distributed import assert_same_run, baseline_config, run_training, variant

from clipmoe.config import RunConfig, from_dict
from clipmoe.deepspeed_engine import check_config, check_resumable, engine_config
from clipmoe.errors import ClipmoeError, ConfigError

pytest.importorskip("deepspeed")


def test_zero_2_trains_as_ddp_and_resumes_exactly(ddp_baseline, tmp_path):
    """2 gloo ranks, the baseline run (MoE in both towers, idle experts without gradients, clipping that binds, the
    logit scale at its clamp) under ZeRO 2: plain DDP's losses and weights; resumed from its step-2 checkpoint (the
    engine's partitioned optimizer state inside clipmoe's checkpoint), the same weights bit for bit."""
    cfg, ddp, _ = ddp_baseline
    z2 = variant(cfg, tmp_path / "z2", deepspeed={"zero_optimization": {"stage": 2}}, save_every=2,
                 keep_checkpoints=2)
    stage2 = run_training(z2, tmp_path / "z2_ranks")
    assert_same_run(stage2, ddp)
    # none, so none repeated at every step: DeepSpeed's ZeRO step calls torch functions that warn of their
    # deprecation each time (its file handles left open by the loader warned once)
    assert [r["warnings"] for r in stage2] == [[], []]
    assert "model" in stage2[0]["files"] and stage2[1]["files"] == []
    step2 = tmp_path / "z2" / "checkpoints" / "step_00000002"
    # the engine's state without its copy of the weights, which are whole in clipmoe's state.pt
    weights = sum(t.numel() * t.element_size() for t in stage2[0]["state"].values())
    assert (step2 / "deepspeed" / "mp_rank_00_model_states.pt").stat().st_size < weights / 10

    again = run_training(variant(z2, tmp_path / "z2b", resume=str(step2)), tmp_path / "again_ranks")
    for r in range(2):
        for name, weight in stage2[r]["state"].items():
            assert torch.equal(again[r]["state"][name], weight), (r, name)
        assert again[r]["losses"] == stage2[0]["losses"][:2] + stage2[r]["losses"][2:]


def test_zero_1_with_expert_parallelism_trains_as_ddp_and_resumes_exactly(ddp_baseline, tmp_path):
    """ZeRO 1 with expert_parallel_size 2 on 2 gloo ranks (the engine holds all but the expert shards; clipmoe
    reduces those and steps them beside it, and the engine's clipping norm counts them): plain DDP's losses and
    weights, the whole model written once; resumed from its step-2 checkpoint, the same weights bit for bit. Such a
    checkpoint does not resume under DeepSpeed without expert parallelism: one error."""
    from clipmoe.resume import load_checkpoint

    cfg, ddp, _ = ddp_baseline
    z1 = variant(cfg, tmp_path / "z1", deepspeed={"zero_optimization": {"stage": 1}}, expert_parallel_size=2,
                 save_every=2, keep_checkpoints=2)
    runs = run_training(z1, tmp_path / "z1_ranks")
    assert_same_run(runs, ddp)  # the clip binds in the baseline: a norm without the experts would differ
    assert [r["warnings"] for r in runs] == [[], []]
    assert "model" in runs[0]["files"] and runs[1]["files"] == []

    step2 = tmp_path / "z1" / "checkpoints" / "step_00000002"
    again = run_training(variant(z1, tmp_path / "z1b", resume=str(step2)), tmp_path / "again_ranks")
    for r in range(2):
        for name, weight in runs[r]["state"].items():
            assert torch.equal(again[r]["state"][name], weight), (r, name)
        assert again[r]["losses"] == runs[0]["losses"][:2] + runs[r]["losses"][2:]

    shared, _ = load_checkpoint(step2, 0)
    assert shared["optimizer"] is None and shared["expert_optimizer"] is not None
    check_resumable(step2, shared, under_deepspeed=True, expert_parallel=True)
    with pytest.raises(ClipmoeError, match="with expert parallelism .* resume with train.expert_parallel_size > 1"):
        check_resumable(step2, shared, under_deepspeed=True, expert_parallel=False)
    with pytest.raises(ClipmoeError, match="resume with train.deepspeed"):
        check_resumable(step2, shared, under_deepspeed=False, expert_parallel=True)
    with pytest.raises(ClipmoeError, match="by 2 ranks and this run has 1; DeepSpeed's optimizer state is per rank"):
        check_resumable(step2, shared, under_deepspeed=True, expert_parallel=True, world=1)
    with pytest.raises(ClipmoeError, match=r"earlier clipmoe, .* \(E, hidden, width\); DeepSpeed's optimizer state"):
        check_resumable(step2, {**shared, "format": "clipmoe-train/1"}, under_deepspeed=True, expert_parallel=True)


def test_one_process_without_zero_and_checkpoint_mismatches(tiny_shards, tmp_path):
    """Without a launcher (no LOCAL_RANK) the engine gets a one-rank group; without ZeRO (clipmoe clips) it ends
    where the plain run ends. A checkpoint written without DeepSpeed does not resume under it, nor the other way
    round, nor one whose engine files are torn: one clear error each."""
    from clipmoe.train import train

    cfg = baseline_config(tiny_shards, tmp_path, save_every=2)
    result = train(from_dict(RunConfig, variant(cfg, tmp_path / "plain")), progress=False)
    plain = [{"state": result.model.state_dict(), "losses": [row["loss"] for row in result.history]}]
    z0 = variant(cfg, tmp_path / "z0", deepspeed={})
    assert_same_run(run_training(z0, tmp_path / "z0_ranks", world=1), plain)

    # a torn engine file: one error, not DeepSpeed's stack trace
    step = max((tmp_path / "z0" / "checkpoints").glob("step_*"))
    for f in (step / "deepspeed").glob("*_states.pt"):
        f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(Exception, match=r"DeepSpeed's state in .*deepspeed is not readable"):
        run_training(variant(z0, tmp_path / "torn", resume=str(step)), tmp_path / "torn_ranks", world=1)

    with pytest.raises(ClipmoeError, match="holds no DeepSpeed state"):
        train(from_dict(RunConfig, variant(z0, tmp_path / "x", resume=str(tmp_path / "plain"))), progress=False)
    with pytest.raises(ClipmoeError, match="written under train.deepspeed"):
        train(from_dict(RunConfig, variant(cfg, tmp_path / "y", resume=str(tmp_path / "z0"))), progress=False)


def _clamp_rank(rank: int, port: int):
    import os

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from torch import nn

    from clipmoe.deepspeed_engine import clamp_logit_scale

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    model = nn.Linear(3, 3)
    model.logit_scale = nn.Parameter(torch.tensor([7.0]))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True})
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    # the optimizer's fp32 copy too, from which the next step writes the weight
    assert safe_get_full_fp32_param(model.logit_scale).item() == pytest.approx(math.log(100))
    torch.distributed.destroy_process_group()


def test_logit_scale_clamp_reaches_zeros_fp32_copy():
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.start_processes(_clamp_rank, args=(_free_port(),), nprocs=1, start_method="spawn")


def _run_cfg(**train) -> RunConfig:
    return from_dict(RunConfig, {"data": {"batch_size": 8}, "optim": {"grad_clip": 1.0}, "train": train})


def test_engine_config_takes_clipmoes_decisions():
    ds = engine_config(_run_cfg(deepspeed={"zero_optimization": {"stage": 2}}), world=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    # without ZeRO clipmoe clips (DeepSpeed's clipping fails on 0-dim gradients)
    assert engine_config(_run_cfg(deepspeed={"gradient_clipping": 1.0}), world=1)["gradient_clipping"] == 0.0
    assert ds["zero_optimization"] == {"stage": 2} and ds["zero_allow_untested_optimizer"] is True
    same = engine_config(_run_cfg(deepspeed={"train_micro_batch_size_per_gpu": 8}), world=1)
    assert same["train_batch_size"] == 8


@pytest.mark.parametrize("ds, match", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu: 4, but data.batch_size"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 0.3}, "optim.grad_clip"),
    ({"bf16": {"enabled": True}}, "train.precision: bf16"),
    ({"optimizer": {"type": "Adam"}}, "optim: section"),
    ({"zero_optimization": {"stage": 3}}, "stages 0, 1 and 2"),
])
def test_engine_config_refuses_what_clipmoe_decides(ds, match):
    with pytest.raises(ClipmoeError, match=match):
        engine_config(_run_cfg(deepspeed=ds), world=2)


def test_deepspeed_config_refuses_unsupported_combinations():
    with pytest.raises(ConfigError, match="cuda_graphs"):
        _run_cfg(deepspeed={}, cuda_graphs=True)
    with pytest.raises(ClipmoeError, match="needs zero_optimization.stage 1 or 2"):
        engine_config(_run_cfg(deepspeed={"zero_optimization": {"stage": 0}}, expert_parallel_size=2), world=2)


def test_deepspeed_keys_it_does_not_know():
    """DeepSpeed ignores a top-level key it does not know (a misspelt `zero_optimizaton` would train without ZeRO):
    one close to a key it reads is an error that names that key, another a warning. Keys it reads pass silently;
    its own validation of a section is one line."""
    with pytest.raises(ClipmoeError, match=r"^train\.deepspeed\.zero_optimizaton: DeepSpeed \S+ has no such key; "
                                           r"did you mean 'zero_optimization'\?"):
        check_config(_run_cfg(deepspeed={"zero_optimizaton": {"stage": 1}}), world=2)
    with pytest.raises(ClipmoeError, match=r"train\.deepspeed\.wall_clock_breakdwon: .*'wall_clock_breakdown'"):
        check_config(_run_cfg(deepspeed={"wall_clock_breakdwon": True}), world=1)
    with pytest.warns(UserWarning, match=r"^train\.deepspeed\.notes: DeepSpeed \S+ does not read this key"):
        check_config(_run_cfg(deepspeed={"notes": "run 7", "zero_optimization": {"stage": 1}}), world=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config(_run_cfg(deepspeed={
            "zero_optimization": {"stage": 2, "overlap_comm": True}, "wall_clock_breakdown": False,
            "activation_checkpointing": {"partition_activations": False}, "flops_profiler": {"enabled": False},
            "tensorboard": {"enabled": False}, "communication_data_type": "fp32", "dump_state": False,
            "checkpoint": {"tag_validation": "Warn"}, "data_types": {"grad_accum_dtype": "fp32"}}), world=2)
    with pytest.raises(ClipmoeError, match=r"refused it: stag: Extra inputs are not permitted \(DeepSpeedZeroConfig\)"):
        check_config(_run_cfg(deepspeed={"zero_optimization": {"stag": 1}}), world=1)


def test_engine_refusals_are_one_line():
    """What `deepspeed.initialize` raises is wrapped as one line: for its config's validation, the key."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    from clipmoe.deepspeed_engine import _reason

    with pytest.raises(Exception) as e:
        DeepSpeedZeroConfig(stage=2, overlap_comm="maybe")
    assert _reason(e.value) == "overlap_comm: Input should be a valid boolean, unable to interpret input " \
                               "(DeepSpeedZeroConfig)"
    assert _reason(ZeRORuntimeException("You are using ZeRO-Offload\nwith ...")) == \
        "ZeRORuntimeException: You are using ZeRO-Offload"
