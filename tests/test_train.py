"""A short real training run on procedural shards: the loss falls and the run's outputs are written."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

import clipmoe
import loaders
from clipmoe.config import RunConfig, from_dict
from clipmoe.errors import ClipmoeError, ConfigError
from clipmoe.loss import clip_loss, total_loss
from clipmoe.moe import MoE
from clipmoe.train import _with_logit_bias, cpu_bf16_matmul_is_slow, train


def _cfg(tiny_shards, tmp_path, **train):
    return from_dict(RunConfig, _cfg_dict(tiny_shards, tmp_path, **train))


def _cfg_dict(tiny_shards, tmp_path, **train):
    return {
        "model": {"arch": "clipmoe-micro", "overrides": {
            "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 1}},
            "text": {"moe": {"num_experts": 4, "top_k": 1, "every": 2, "capacity_factor": 1.0}}}},
        "data": {"train": tiny_shards["train"], "batch_size": 32},
        "loss": {"balance_coef": 0.01, "z_coef": 0.001},
        "optim": {"lr": 2e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"steps": 60, "log_every": 5, "out_dir": str(tmp_path / "run"), **train},
    }


def _no_speed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "speed"} for row in history]


def test_loss_falls_and_outputs_written(tiny_shards, tmp_path):
    result = train(_cfg(tiny_shards, tmp_path), progress=False)
    losses = [r["contrastive"] for r in result.history]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.3, losses
    assert all(k in result.history[0] for k in ("loss", "contrastive", "balance", "z", "lr", "moe"))
    assert [(r["tower"], r["block"]) for r in result.history[-1]["moe"]] == [("image", 0), ("image", 1), ("text", 1)]
    assert set(result.expert_load) == {"image.0", "image.1", "text.1"}
    for fractions in result.expert_load.values():
        assert len(fractions) == 4 and abs(sum(fractions) - 1) < 1e-5
    # 60 steps x 32 samples over 256-sample epochs: every sample was seen, and counted
    assert result.data_stats["samples"] == 60 * 32 and result.data_stats["skipped"] == {}
    for key in ("model", "metrics", "loss_plot", "expert_load_plot", "moe_plot"):
        assert result.files[key].is_file()
    for key in ("loss_plot", "expert_load_plot", "moe_plot"):
        assert result.files[key].read_bytes()[:4] == b"\x89PNG"
    assert len(result.files["metrics"].read_text().splitlines()) == len(result.history)
    back = clipmoe.load(result.files["model"])
    assert back.config == result.model.config


def test_log_is_written_as_the_run_goes(tiny_shards, tmp_path, monkeypatch):
    import clipmoe.train as train_module

    steps = []

    def loss_going_nan(out, cfg):  # the real terms, the loss NaN from the 8th step on
        terms = total_loss(out, cfg)
        steps.append(None)
        if len(steps) >= 8:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(train_module, "total_loss", loss_going_nan)
    cfg = _cfg(tiny_shards, tmp_path, steps=20, log_every=2)
    with pytest.raises(ClipmoeError, match=r"loss is nan at step 8; .*the log so far: .*metrics.jsonl"):
        train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) for r in rows[:-1]) and math.isnan(rows[-1]["loss"])
    assert rows[0]["moe"][0]["tower"] == "image"


def test_log_rows_carry_the_training_speed(tiny_shards, tmp_path, monkeypatch):
    """Samples/s and the share of time waiting for data, on a clock that only the loader (1 s a batch), the loss
    (0.5 s a step) and evaluations (7 s, not training time) move."""
    import types

    import clipmoe.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_batches, real_loss, real_validate = train_module._batches, train_module.total_loss, train_module.validate

    def slow_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            clock[0] += 1.0
            yield batch

    def slow_loss(out, cfg):
        clock[0] += 0.5
        return real_loss(out, cfg)

    def slow_validate(*args, **kwargs):
        clock[0] += 7.0
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train_module, "_batches", slow_batches)
    monkeypatch.setattr(train_module, "total_loss", slow_loss)
    monkeypatch.setattr(train_module, "validate", slow_validate)
    cfg = _cfg(tiny_shards, tmp_path, steps=9, log_every=4)
    cfg.data.eval, cfg.eval.every = tiny_shards["eval"], 2
    result = train(cfg, progress=False)
    speeds = [(r["step"], r["speed"]) for r in result.history]
    assert speeds[0] == (0, {"samples_per_s": None, "data_wait": None})  # no step finished before it
    # the rows of steps 4 and 8: steps 0-3 and 4-7, 32 samples in 1.5 s each, 2/3 of it waiting for data
    for step, speed in speeds[1:]:
        assert speed == {"samples_per_s": round(32 / 1.5, 1), "data_wait": round(1 / 1.5, 3)}, step
    assert [s for s, _ in speeds] == [0, 4, 8]


def _interrupt_at(calls: int, signum: int = signal.SIGINT):
    """A decorator: the wrapped function sends this process Ctrl-C (SIGINT), or `signum`, at its `calls`-th call,
    then runs."""
    seen = []

    def wrap(fn):
        def wrapped(*args, **kwargs):
            seen.append(None)
            if len(seen) == calls:
                # SIGTERM's default action would end the test run itself, not only the training
                assert signal.getsignal(signum) is not signal.SIG_DFL, f"no handler for {signum!r}"
                os.kill(os.getpid(), signum)
            return fn(*args, **kwargs)
        return wrapped
    return wrap


def test_ctrl_c_writes_the_steps_done_and_exits_130(tiny_shards, tmp_path, monkeypatch, capsys):
    import clipmoe.train as train_module
    from clipmoe.cli import main

    # Ctrl-C in the 4th step's forward: 3 steps done, written out as a run of 3 steps
    monkeypatch.setattr(train_module, "total_loss", _interrupt_at(4)(total_loss))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg_dict(tiny_shards, tmp_path, steps=20, log_every=1)))
    assert main(["train", str(tmp_path / "c.yaml")]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    model_file = tmp_path / "run" / "model.safetensors"
    assert err == f"clipmoe train: interrupted after 3 of 20 steps; its model: {model_file}"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert clipmoe.load(model_file).config.vision.moe.num_experts == 4
    for plot in ("loss.png", "expert_load.png", "moe.png"):
        assert (tmp_path / "run" / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_checkpoint_resumes_exactly(tiny_shards, tmp_path, monkeypatch, capsys, signum):
    """Ctrl-C (or SIGTERM: `kill`, `timeout`, SLURM's time limit) in the 4th step's forward (its batch already
    drawn) with checkpoints on: the checkpoint is of the 3 steps done, and `--resume latest` continues to the
    weights of an uninterrupted run."""
    import clipmoe.train as train_module
    from clipmoe.cli import main

    straight = train(_cfg(tiny_shards, tmp_path / "straight", steps=8, log_every=1), progress=False)
    monkeypatch.setattr(train_module, "total_loss", _interrupt_at(4, signum)(total_loss))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg_dict(tiny_shards, tmp_path, steps=8, log_every=1,
                                                              save_every=5)))
    assert main(["train", str(tmp_path / "c.yaml")]) == 128 + signum
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # only while training
    step3 = tmp_path / "run" / "checkpoints" / "step_00000003"
    how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"clipmoe train: {how} after 3 of 8 steps; its model: {tmp_path / 'run' / 'model.safetensors'}; "
        f"to continue: --resume {step3}")
    monkeypatch.setattr(train_module, "total_loss", total_loss)
    assert main(["train", str(tmp_path / "c.yaml"), "--resume", "latest"]) == 0
    resumed = clipmoe.load(tmp_path / "run" / "model.safetensors")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000008"]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the stand-in step
def test_ctrl_c_waits_for_the_parameter_update(tiny_shards, tmp_path, monkeypatch):
    import clipmoe.train as train_module
    from clipmoe.train import TrainingInterrupted

    original = train_module.build_optimizer

    def build_optimizer(model, cfg, steps):  # Ctrl-C arrives while the 3rd step updates the parameters
        opt, sched = original(model, cfg, steps)
        opt.step = _interrupt_at(3)(opt.step)
        return opt, sched

    monkeypatch.setattr(train_module, "build_optimizer", build_optimizer)
    with pytest.raises(TrainingInterrupted) as caught:
        train(_cfg(tiny_shards, tmp_path, steps=20), progress=False)
    result = caught.value.result
    assert result.steps == 3  # the update finished, and counts
    saved = clipmoe.load(result.files["model"]).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in result.model.state_dict().items())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_before_the_first_step_is_a_plain_interrupt(tiny_shards, tmp_path, monkeypatch):
    import clipmoe.train as train_module

    monkeypatch.setattr(train_module, "total_loss", _interrupt_at(1)(total_loss))
    with pytest.raises(KeyboardInterrupt) as caught:
        train(_cfg(tiny_shards, tmp_path, steps=20), progress=False)
    assert type(caught.value) is KeyboardInterrupt  # nothing trained, nothing written but the (empty) log
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_stop_now_raises_at_once_holds_during_the_update_and_again_at_the_next_step():
    """One process (StopNow): Ctrl-C and SIGTERM raise at once, are held during the optimizer's update and raised
    when it ends, and are raised again at the next step's start where the first raise was lost (Python drops an
    exception raised in a finalizer: it once let a run go on after the DataLoader's shutdown swallowed it)."""
    from clipmoe.stopping import StopNow, Terminated

    def signal_and_wait(signum):
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the signal would have been delivered here

    batches = iter(range(5))
    stopper = StopNow()
    stopper.install()
    try:
        assert signal.getsignal(signal.SIGINT) == stopper._take == signal.getsignal(signal.SIGTERM)
        assert stopper.next_batch(batches, 0) == 0
        with pytest.raises(KeyboardInterrupt) as caught:
            signal_and_wait(signal.SIGINT)
        assert type(caught.value) is KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):  # noted: the next step stops too, taking no batch
            stopper.next_batch(batches, 0)
        assert next(batches) == 1
    finally:
        stopper.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    ran, stopper = [], StopNow()
    stopper.install()
    try:
        with pytest.raises(Terminated):
            with stopper.held():
                signal_and_wait(signal.SIGTERM)
                ran.append("after SIGTERM")
        assert ran == ["after SIGTERM"]
        with stopper.held():  # nothing new: nothing raised
            pass
    finally:
        stopper.restore()

    class Finalized:
        def __del__(self):
            signal_and_wait(signal.SIGTERM)

    stopper, unraisable = StopNow(), []
    stopper.install()
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        Finalized()  # its finalizer gets the signal: Python drops the Terminated raised there
        assert [type(u.exc_value) for u in unraisable] == [Terminated]
        with pytest.raises(Terminated):
            stopper.next_batch(batches, 0)
    finally:
        sys.unraisablehook = hook
        stopper.restore()

    stopper = StopNow()  # a child forked with the handler (a loader worker before its own): not its signal
    stopper.install()
    try:
        child = os.fork()
        if child == 0:
            try:
                signal_and_wait(signal.SIGTERM)
                os._exit(3 if stopper.signals else 0)
            except BaseException:
                os._exit(4)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    finally:
        stopper.restore()

    mine = signal.signal(signal.SIGINT, lambda *a: ran.append("mine"))  # someone else's handler stays theirs
    stopper = StopNow()
    stopper.install()
    try:
        signal_and_wait(signal.SIGINT)
        assert ran[-1] == "mine" and stopper.signals == []
    finally:
        stopper.restore()
        signal.signal(signal.SIGINT, mine)


def test_stop_vote_notes_the_first_signal_and_exits_at_the_second():
    """Several processes (StopVote, tested across 2 real ranks in test_distributed): the first Ctrl-C or SIGTERM is
    noted for the next step's vote; a second one ends the process at once, with the shell's status for it."""
    from clipmoe.stopping import StopVote

    vote = StopVote()
    restore = vote.install()
    try:
        assert signal.getsignal(signal.SIGINT) == vote._take and signal.getsignal(signal.SIGTERM) == vote._take
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # delivered here: noted, nothing raised
        assert vote.signals == [signal.SIGTERM]
        with pytest.raises(SystemExit) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert caught.value.code == 128 + signal.SIGINT
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back by the second signal
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_bf16_autocast_keeps_losses_finite(tiny_shards, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_cfg(tiny_shards, tmp_path, steps=20, precision="bf16"), progress=False)
    # said once where this CPU has no fast bf16 matmul (an AVX2 machine), never where it has
    slow = [w for w in caught if "without bf16 matmul kernels" in str(w.message)]
    assert len(slow) == int(cpu_bf16_matmul_is_slow())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert result.model.image.blocks[0].mlp.router.weight.dtype == torch.float32


def test_train_takes_a_yaml_file_or_a_dict_as_the_cli_does(tiny_shards, tmp_path):
    data = _cfg_dict(tiny_shards, tmp_path, steps=3, log_every=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    from_yaml = train(tmp_path / "run.yaml", progress=False)
    from_dict_ = train({**data, "train": {**data["train"], "out_dir": str(tmp_path / "run2")}}, progress=False)
    assert _no_speed(from_yaml.history) == _no_speed(from_dict_.history) and len(from_yaml.history) == 3
    with pytest.raises(ConfigError, match="^modle: unknown key"):
        train({**data, "modle": {}})
    with pytest.raises(ConfigError, match="^a run config is a RunConfig, a YAML file or a dict, not list$"):
        train([data])


def test_clip_loss_against_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    by_hand = 0.0
    for i in range(6):
        by_hand += -torch.log_softmax(logits[i], 0)[i] / 12 - torch.log_softmax(logits[:, i], 0)[i] / 12
    assert clip_loss(img, txt, scale).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert clip_loss(img, txt, torch.tensor(1e4)).item() == pytest.approx(
        clip_loss(img, txt, torch.tensor(100.0)).item())  # the scale is clamped at 100


def test_aux_terms_weighted_by_config():
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2).train()
    out = model(torch.randn(4, 3, 16, 16), clipmoe.get_tokenizer(model)(["a", "b", "c", "d"]))
    cfg = from_dict(RunConfig, {"loss": {"balance_coef": 0.5, "z_coef": 0.25}}).loss
    terms = total_loss(out, cfg)
    expected = terms["contrastive"] + 0.5 * sum(a.balance_loss for a in out.aux) + 0.25 * sum(a.z_loss for a in out.aux)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_forward_with_one_tower_as_open_clip():
    """model(images, None) / model(None, tokens): only that tower runs (its features, its MoE reports), the
    other's features are None, as open_clip's forward does; the loss, which needs both, says so in one line."""
    torch.manual_seed(0)
    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=2, every=1).eval()
    images, tokens = torch.randn(3, 3, 16, 16), clipmoe.get_tokenizer(model)(["a", "b c", "d"])
    both = model(images, tokens)
    image_only, text_only = model(images), model(tokens=tokens)
    assert image_only.text_features is None and text_only.image_features is None
    torch.testing.assert_close(image_only.image_features, both.image_features, rtol=0, atol=0)
    torch.testing.assert_close(text_only.text_features, both.text_features, rtol=0, atol=0)
    assert {a.tower for a in image_only.aux} == {"image"} and {a.tower for a in text_only.aux} == {"text"}
    assert len(image_only.aux) + len(text_only.aux) == len(both.aux)
    assert [r["tower"] for r in clipmoe.moe_report(text_only)] == ["text"] * len(text_only.aux)
    cfg = from_dict(RunConfig, {}).loss
    for out in (image_only, text_only):
        with pytest.raises(ClipmoeError, match="needs both towers' features"):
            total_loss(out, cfg)


def test_expert_choice_layers_train_without_the_balance_loss():
    """Expert choice is balanced by construction (Zhou et al. 2022): its layers report a balance term but the loss
    leaves it out, its router gets no gradient from it; token-choice layers keep theirs."""
    model = clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 4, "router": "expert_choice"}},
                                 text={"moe": {"num_experts": 4, "top_k": 1}}).train()
    images, texts = torch.randn(4, 3, 16, 16), clipmoe.get_tokenizer(model)(["a b", "c", "d e f", "g"])
    cfg = from_dict(RunConfig, {"loss": {"balance_coef": 1.0, "z_coef": 0.0}}).loss
    out = model(images, texts)
    assert {a.routing for a in out.aux} == {"expert_choice", "topk"}
    terms = total_loss(out, cfg)
    text_balance = sum(a.balance_loss for a in out.aux if a.tower == "text")
    assert terms["balance"].item() == pytest.approx(text_balance.item(), rel=1e-6)
    assert all(r["balance_loss"] > 0 for r in clipmoe.moe_report(out))  # still reported for every layer
    # the balance term alone: no gradient for an expert-choice router, some for a token-choice one
    model.zero_grad()
    terms["balance"].backward()
    routers = {m.tower: m.router.weight.grad for m in model.modules() if isinstance(m, MoE)}
    assert routers["image"] is None and routers["text"].abs().sum() > 0
    # a model of expert-choice layers only has no balance term
    ec = clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 4, "router": "expert_choice"}}).train()
    terms = total_loss(ec(images, texts), cfg)
    assert "balance" not in terms and "z" in terms


def test_train_cli_bad_config_is_one_line(tmp_path, capsys):
    from clipmoe.cli import main

    (tmp_path / "c.yaml").write_text("train: {steps: -3}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipmoe train: error: train.steps") and "\n" not in err


def test_limoe_entropy_terms_against_formula():
    from clipmoe.loss import entropy_terms

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, every=1).train()
    with torch.no_grad():
        for b in model.text.blocks:
            b.mlp.router.weight.normal_()
    out = model(torch.randn(4, 3, 16, 16), clipmoe.get_tokenizer(model)(["a b c", "d", "e f", "g"]))
    terms = entropy_terms(out.aux, "text", threshold=2.0)
    text_aux = [a for a in out.aux if a.tower == "text"]
    assert terms["text_local_entropy"].item() == pytest.approx(sum(a.entropy.item() for a in text_aux), rel=1e-6)
    expected_global = sum(max(0.0, 2.0 - a.marginal_entropy.item()) for a in text_aux)
    assert terms["text_global_entropy"].item() == pytest.approx(expected_global, rel=1e-6)
    entropy = {"local_coef": 0.5, "global_coef": 2.0, "global_threshold": 2.0}
    cfg = from_dict(RunConfig, {"loss": {"text_entropy": entropy}}).loss
    total = total_loss(out, cfg)
    assert total["text_local_entropy"].item() == pytest.approx(terms["text_local_entropy"].item())
    extra = 0.5 * terms["text_local_entropy"] + 2.0 * terms["text_global_entropy"]
    base = total["contrastive"] + cfg.balance_coef * total["balance"] + cfg.z_coef * total["z"]
    assert total["loss"].item() == pytest.approx((base + extra).item(), rel=1e-6)
    # the uniform router of a fresh upcycle has maximal entropy: local log E, global term 0
    fresh = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=4, every=1).train()
    out = fresh(torch.randn(2, 3, 16, 16), clipmoe.get_tokenizer(fresh)(["a", "b"]))
    t = entropy_terms(out.aux, "image")
    assert t["image_local_entropy"].item() == pytest.approx(2 * math.log(4), rel=1e-5)
    assert t["image_global_entropy"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_bf16_quickstart_model_300_steps_finite(tiny_shards, tmp_path):
    from clipmoe.quickstart import QUICKSTART

    data = json.loads(json.dumps(QUICKSTART))
    # batches of 8: CPUs without AVX-512 have no fast bf16 matmul (about 1.5 s per step at 32 on a 2-core AVX2 EPYC)
    data["data"] = {"train": tiny_shards["train"], "batch_size": 8}
    data["model"]["overrides"]["vision"]["image_size"] = 16  # the tiny shards are 16 px
    data["model"]["overrides"]["vision"]["patch_size"] = 4
    data["train"] = {"steps": 300, "precision": "bf16", "log_every": 1, "out_dir": str(tmp_path / "run")}
    result = train(from_dict(RunConfig, data), progress=False)
    assert len(result.history) == 300
    for row in result.history:
        assert all(math.isfinite(v) for k, v in row.items() if k not in ("moe", "speed")), row
    assert row["z"] > 0
    for m in result.model.modules():
        if isinstance(m, MoE):
            assert m.router.weight.dtype == torch.float32


def test_zeroshot_evaluation_hook(tiny_shards, tmp_path):
    from PIL import Image

    root = tmp_path / "colours"
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), tuple(c + 5 * i for c in rgb)).save(root / name / f"{i}.png")
    # a cifar10 export that opens (its shard is there) but cannot be read: each of its evaluations fails
    (root / "wds_cifar10" / "test").mkdir(parents=True)
    (root / "wds_cifar10" / "test" / "0.tar").write_bytes(b"not a tar file" * 100)
    cfg = _cfg(tiny_shards, tmp_path, steps=6, log_every=3)
    cfg.eval = from_dict(type(cfg.eval), {"zeroshot": ["folder", "cifar10"], "data_root": str(root), "every": 1})
    result = train(cfg, progress=False)
    assert [run["step"] for run in result.zeroshot] == [0, 1, 2, 3, 4, 5]
    assert result.history[0]["zeroshot"]["folder"] is not None  # logged rows carry it (step 0 too)
    folder, missing = result.zeroshot[-1]["results"]
    assert folder["num_samples"] == 6 and 0 <= folder["metrics"]["top1"] <= 1
    assert "error" in missing  # its shard unreadable: reported, training went on
    assert result.history[-1]["step"] == 5 and set(result.history[-1]["zeroshot"]) == {"folder", "cifar10"}
    assert json.loads(result.files["zeroshot"].read_text())[-1]["step"] == 5
    assert result.files["zeroshot_plot"].read_bytes()[:4] == b"\x89PNG"
    assert result.files["loss_plot"].is_file()


def test_eval_config_needs_a_data_root():
    with pytest.raises(clipmoe.ConfigError, match="data_root"):
        from_dict(RunConfig, {"eval": {"zeroshot": ["imagenet1k"]}})


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_graphs_need_a_gpu(tiny_shards, tmp_path, precision):
    with pytest.raises(ClipmoeError, match="needs a CUDA device"):
        train(_cfg(tiny_shards, tmp_path, cuda_graphs=True, precision=precision, device="cpu"), progress=False)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while `fn` runs (activation memory)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_grad_checkpointing_same_gradients_less_activation_memory():
    torch.manual_seed(0)
    dense = clipmoe.create_model("clipmoe-tiny")
    # capacity drops and router jitter: the recomputation must route as the forward did (same RNG draws)
    plain = clipmoe.upcycle(dense, num_experts=4, top_k=2, every=1, capacity_factor=0.8, jitter=0.1,
                            noise_std=0.3).train()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    ckpt = clipmoe.upcycle(dense, num_experts=4, top_k=2, every=1, capacity_factor=0.8, jitter=0.1).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing()
    images = torch.randn(6, 3, 64, 64)
    tokens = clipmoe.get_tokenizer(dense)(["a red square", "two blue circles at the top", "", "a", "b c", "d"])
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(3)
        out = model(images, tokens)
        loss = clip_loss(out.image_features, out.text_features, out.logit_scale) \
            + sum(0.01 * a.balance_loss + 0.001 * a.z_loss for a in out.aux)
        torch.manual_seed(3)
        saved = _saved_bytes(lambda: model(images, tokens))
        loss.backward()
        results.append((loss.detach(), clipmoe.moe_report(out), saved,
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, report_a, saved_a, grads_a), (loss_b, report_b, saved_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and report_a == report_b
    assert any(r["dropped_fraction"] > 0 for r in report_a)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)
    assert saved_b < 0.35 * saved_a, (saved_b, saved_a)
    with torch.no_grad():  # no autograd, no checkpoint: the plain forward
        assert _saved_bytes(lambda: ckpt(images, tokens)) == 0


def test_train_with_grad_checkpointing(tiny_shards, tmp_path):
    runs = [train(_cfg(tiny_shards, tmp_path / str(flag), steps=4, log_every=1, grad_checkpointing=flag),
                  progress=False) for flag in (False, True)]
    assert runs[1].model.image.grad_checkpointing and not runs[0].model.image.grad_checkpointing
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(clipmoe.ConfigError, match="grad_checkpointing.*cannot be combined with cuda_graphs"):
        _cfg(tiny_shards, tmp_path, grad_checkpointing=True, cuda_graphs=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(tiny_shards, tmp_path, num_workers):
    """6 steps straight equal 2 (or 4) steps, a checkpoint, and the rest from it (weights bit for bit, log rows),
    with router jitter drawing from torch's RNG, layers of two sizes (per_block) and the data split over loader workers;
    step 4 ends an epoch."""
    def cfg(out, **train_kw):
        d = _cfg_dict(tiny_shards, tmp_path, steps=6, log_every=1, out_dir=str(tmp_path / out), save_every=2,
                      **train_kw)
        d["model"]["overrides"]["vision"]["moe"].update(jitter=0.1, per_block={0: {"num_experts": 2, "top_k": 1}})
        d["data"].update(batch_size=64, num_workers=num_workers)  # 4 batches an epoch: step 5 is in epoch 2
        return from_dict(RunConfig, d)

    straight = train(cfg("a", keep_checkpoints=3), progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (2, 4, 6)]
    for step in (2, 4):
        ckpt = tmp_path / "a" / "checkpoints" / f"step_0000000{step}"
        assert sorted(p.name for p in ckpt.iterdir()) == ["rank0.pt", "state.pt"]
        resumed = train(cfg(f"b{step}", resume=str(ckpt)), progress=False)
        for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(a, b), (step, name)
        assert _no_speed(resumed.history) == _no_speed(straight.history) and resumed.steps == 6
        assert [b.mlp.experts.w1.shape[0] for b in resumed.model.image.blocks] == [2, 4]
        rows = (tmp_path / f"b{step}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in rows] == list(range(6))
        assert resumed.data_stats == straight.data_stats
        assert resumed.expert_load == straight.expert_load
    # "latest" in a run folder with no checkpoint yet is a fresh start; with one, that one (here: step 6, done)
    assert [p.name for p in (tmp_path / "b4" / "checkpoints").iterdir()] == ["step_00000006"]
    again = train(cfg("b4", resume="latest"), progress=False)
    assert again.steps == 6 and torch.equal(again.model.logit_scale, straight.model.logit_scale)


def test_resume_reads_checkpoints_of_the_earlier_experts_layout(tiny_shards, tmp_path):
    """A training checkpoint of format clipmoe-train/1, which held the experts' matrices and their AdamW moments as
    (E, hidden, width), resumes into today's (E, width, hidden) layout: the weights of the straight run, bit for bit."""
    def cfg(out, **train_kw):
        d = _cfg_dict(tiny_shards, tmp_path, steps=4, log_every=1, out_dir=str(tmp_path / out), **train_kw)
        d["data"].update(batch_size=64)
        return from_dict(RunConfig, d)

    straight = train(cfg("a", save_every=2, keep_checkpoints=2), progress=False)
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    experts = [name for name in state["model"] if name.endswith((".experts.w1", ".experts.w2"))]
    assert experts
    old = lambda t: t.transpose(-2, -1).contiguous()  # noqa: E731
    state["model"].update({name: old(state["model"][name]) for name in experts})
    moved = 0
    for moments in state["optimizer"]["state"].values():  # the model's only 3-D parameters are the experts'
        if moments["exp_avg"].ndim == 3:
            moments.update({k: old(v) for k, v in moments.items() if v.ndim == 3})
            moved += 1
    assert moved == len(experts)
    state["format"] = "clipmoe-train/1"
    torch.save(state, ckpt / "state.pt")
    resumed = train(cfg("b", resume=str(ckpt)), progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]


def test_resume_with_another_data_layout_goes_on_with_a_fresh_epoch(tiny_shards, tmp_path):
    """A checkpoint whose data positions do not fit the resumed run (other loader workers; a shard list that grew)
    resumes the model, optimizer, schedule, step and log, says so once, and reads the data from the first epoch no
    rank had begun (256 samples an epoch in batches of 64: step 3 is in epoch 0, step 5 in epoch 1)."""
    def cfg(out, workers, train_urls=tiny_shards["train"], steps=6, **train_kw):
        d = _cfg_dict(tiny_shards, tmp_path, steps=steps, log_every=1, out_dir=str(tmp_path / out), **train_kw)
        d["data"].update(batch_size=64, num_workers=workers, train=train_urls)
        return from_dict(RunConfig, d)

    straight = train(cfg("a", 0, save_every=3, keep_checkpoints=2), progress=False)
    more = tiny_shards["train"] + "," + tiny_shards["eval"]
    for step, workers, urls, change, epoch in [(3, 2, tiny_shards["train"], "num_workers 0 -> 2", 1),
                                               (6, 0, more, "shards 4 -> 5", 2)]:
        ckpt = tmp_path / "a" / "checkpoints" / f"step_0000000{step}"
        steps = max(6, step + 2)
        with pytest.warns(UserWarning) as caught:
            resumed = train(cfg(f"b{step}", workers, urls, steps=steps, resume=str(ckpt)), progress=False)
        said = [str(w.message) for w in caught if "train.resume" in str(w.message)]
        assert said == [f"train.resume: {ckpt} resumes the model, optimizer, schedule and step, but not its data "
                        f"positions, which were saved for another layout ({change}): the data goes on with epoch "
                        f"{epoch}, which no rank had begun"]
        assert resumed.steps == steps and _no_speed(resumed.history[:step]) == _no_speed(straight.history[:step])
        # the schedule went on from the checkpoint's step (a fresh one would be warming up again)
        assert [r["lr"] for r in resumed.history[step:6]] == [r["lr"] for r in straight.history[step:6]]
        assert resumed.data_stats["samples"] == steps * 64
        assert all(math.isfinite(r["loss"]) for r in resumed.history)


def test_fresh_data_epoch_is_the_first_no_rank_had_begun(tmp_path):
    from clipmoe.resume import fresh_data_epoch

    def write(rank, epoch, items):
        torch.save({"loader": {"epoch": epoch, "workers": {w: {"items": n} for w, n in enumerate(items)}}, "rng": {}},
                   tmp_path / f"rank{rank}.pt")

    write(0, 3, [2, 1])
    write(1, 3, [0, 0])  # ended epoch 2 with the previous step, not yet read from epoch 3
    assert fresh_data_epoch(tmp_path, 1) == fresh_data_epoch(tmp_path, 2) == 4
    write(1, 4, [1, 0])  # a rank an epoch ahead of the others
    assert fresh_data_epoch(tmp_path, 2) == 5
    write(0, 3, [0, 0])
    assert fresh_data_epoch(tmp_path, 1) == 3


def test_a_new_run_does_not_write_over_another_runs_work(tiny_shards, tmp_path):
    d = _cfg_dict(tiny_shards, tmp_path, steps=4, save_every=2)
    first = train(from_dict(RunConfig, d), progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    model_bytes = first.files["model"].read_bytes()
    shorter = {**d, "train": {**d["train"], "steps": 2}}  # its checkpoint would have been pruned as the older one
    with pytest.raises(ClipmoeError, match=r"^train.out_dir .*run holds another run's checkpoints \(up to "
                                           r"step_00000004\): continue that run with train.resume: latest"):
        train(from_dict(RunConfig, shorter), progress=False)
    assert [p.name for p in ckpts.iterdir()] == ["step_00000004"] and first.files["model"].read_bytes() == model_bytes
    shutil.copytree(ckpts, tmp_path / "source" / "checkpoints")  # resuming another run's checkpoint: not here
    with pytest.raises(ClipmoeError, match="holds another run's checkpoints"):
        train(from_dict(RunConfig, {**d, "train": {**d["train"], "resume": str(tmp_path / "source")}}),
              progress=False)
    # a finished run without checkpoints: its model is kept
    plain = {**d, "train": {**d["train"], "save_every": 0, "out_dir": str(tmp_path / "plain")}}
    train(from_dict(RunConfig, plain), progress=False)
    with pytest.raises(ClipmoeError, match="^train.out_dir .*plain holds a finished run"):
        train(from_dict(RunConfig, plain), progress=False)
    # a run that stopped before leaving any work (no checkpoint, no model) may be started over
    (tmp_path / "plain" / "model.safetensors").unlink()
    assert train(from_dict(RunConfig, plain), progress=False).steps == 4


def test_resume_errors_are_one_line(tiny_shards, tmp_path):
    base = _cfg_dict(tiny_shards, tmp_path, steps=2, save_every=1)
    train(from_dict(RunConfig, base), progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    for spec, why in [(tmp_path / "nowhere", "not found"), (tmp_path, "holds no training checkpoint")]:
        with pytest.raises(ClipmoeError, match=f"^train.resume: .*{why}"):
            train(from_dict(RunConfig, {**base, "train": {**base["train"], "resume": str(spec)}}), progress=False)
    with pytest.raises(ClipmoeError, match=r"^train.resume: .*step_00000002 is at step 2, past train.steps \(1\)"):
        train(from_dict(RunConfig, {**base, "train": {**base["train"], "steps": 1, "resume": str(ckpt)}}),
              progress=False)
    other = {**base, "model": {"arch": "clipmoe-micro"}, "train": {**base["train"], "resume": str(ckpt)}}
    with pytest.raises(ClipmoeError, match="^train.resume: .* does not match"):
        train(from_dict(RunConfig, other), progress=False)
    (ckpt / "rank0.pt").write_bytes(b"\x80\x04 torn")
    with pytest.raises(ClipmoeError, match="^train.resume: .*rank0.pt is not readable"):
        train(from_dict(RunConfig, {**base, "train": {**base["train"], "resume": str(ckpt)}}), progress=False)
    with pytest.raises(clipmoe.ConfigError, match="save_every"):
        from_dict(RunConfig, {"train": {"save_every": -1}})


def test_sigmoid_loss_against_formula_and_open_clip():
    import open_clip

    from clipmoe.loss import sigmoid_loss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    by_hand = sum(-math.log(torch.sigmoid((1 if i == j else -1) * (scale * img[i] @ txt[j] + bias)).item())
                  for i in range(5) for j in range(5)) / 5
    assert sigmoid_loss(img, txt, scale, bias).item() == pytest.approx(by_hand, rel=1e-5)
    assert sigmoid_loss(img, txt, scale, bias).item() == pytest.approx(
        open_clip.loss.SigLipLoss()(img, txt, scale, bias).item(), rel=1e-6)


def test_training_with_the_sigmoid_loss(tiny_shards, tmp_path):
    d = _cfg_dict(tiny_shards, tmp_path, steps=30)
    d["loss"]["kind"] = "sigmoid"
    cfg = from_dict(RunConfig, d)
    with pytest.raises(ClipmoeError, match="^loss.kind sigmoid needs a model with a logit bias, and this one"):
        train(cfg, model=clipmoe.create_model(cfg.model), progress=False)  # a given model is not rebuilt
    # an architecture without a bias gets SigLIP's start, as open_clip's --siglip does
    start = clipmoe.create_model(_with_logit_bias(cfg.model))
    assert start.logit_bias.item() == -10.0 and start.logit_scale.item() == pytest.approx(math.log(10))
    result = train(cfg, progress=False)
    losses = [row["contrastive"] for row in result.history]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
    assert result.model.logit_bias.item() != -10.0
    reloaded = clipmoe.load(result.files["model"])  # the bias is a weight of the saved model
    assert torch.equal(reloaded.logit_bias, result.model.logit_bias)


def test_clip_weights_fine_tuned_with_the_sigmoid_loss_start_from_the_configured_bias(tmp_path):
    dense = clipmoe.create_model("clipmoe-micro")
    clipmoe.save_open_clip(dense, tmp_path / "clip.bin")  # CLIP weights: no logit_bias
    section = from_dict(RunConfig, {"model": {"arch": "clipmoe-micro", "pretrained": str(tmp_path / "clip.bin"),
                                              "overrides": {"init_logit_scale": 1.0}}}).model
    model = clipmoe.create_model(_with_logit_bias(section))
    assert model.logit_bias.item() == -10.0  # the config's start
    assert model.logit_scale.item() == dense.logit_scale.item()  # the weights' scale, not the config's
    assert _with_logit_bias(section).overrides["init_logit_scale"] == 1.0  # one that is set is kept


def test_locked_towers_train_only_their_unlocked_groups(tiny_shards, tmp_path):
    """LiT-style locking with open_clip's groups: a locked tower's frozen weights do not move (MoE routers and
    experts included); its unlocked groups and the other tower do."""
    def run(name, **train_kw):
        cfg = _cfg(tiny_shards, tmp_path / name, steps=3, **train_kw)
        torch.manual_seed(cfg.train.seed)  # as train seeds before it builds the model: the same initial weights
        before = {k: v.clone() for k, v in clipmoe.create_model(cfg.model).state_dict().items()}
        after = train(cfg, progress=False).model.state_dict()
        return {k for k in before if not torch.equal(before[k], after[k])}

    moved = run("image", lock_image=True)
    assert moved and not any(k.startswith("image.") for k in moved) and any(k.startswith("text.") for k in moved)
    moved = run("image1", lock_image=True, lock_image_unlocked_groups=1)
    assert {k for k in moved if k.startswith("image.")} == {"image.proj"}
    moved = run("text2", lock_text=True, lock_text_unlocked_layers=2)  # the projection; last block and norm
    text = {k for k in moved if k.startswith("text.")}
    assert "text.proj" in text and "text.norm.weight" in text and "text.blocks.1.mlp.router.weight" in text
    assert not any(k.startswith(("text.blocks.0.", "text.token_embed", "text.pos_embed")) for k in text)
    assert any(k.startswith("image.blocks.0.") for k in moved)


def test_lock_groups_match_open_clip():
    import open_clip

    ours, theirs = clipmoe.create_model("ViT-B-32"), open_clip.create_model("ViT-B-32")
    for n in range(0, 16):
        ours.lock_image_tower(n)
        theirs.visual.lock(n)
        ours.lock_text_tower(n)
        theirs.lock_text_tower(n)
        trainable = {k for k, p in ours.named_parameters() if p.requires_grad}
        expected = {k for k, p in theirs.named_parameters() if p.requires_grad}
        renamed = set(clipmoe.adapter.from_open_clip(dict.fromkeys(expected, torch.zeros(1))))
        assert trainable == renamed, n


def test_each_launched_process_takes_its_own_gpu():
    """Under torchrun (LOCAL_RANK), a bare "cuda" is this process's GPU; an explicit index or another device stays
    as given; more processes than GPUs is one clear error."""
    from clipmoe.train import local_device

    cuda = torch.device("cuda")
    assert local_device(cuda, "3", gpus=8) == torch.device("cuda", 3)
    assert local_device(cuda, None, gpus=8) == cuda  # no launcher: the current device
    assert local_device(torch.device("cuda", 1), "3", gpus=8) == torch.device("cuda", 1)
    assert local_device(torch.device("cpu"), "3", gpus=0) == torch.device("cpu")
    with pytest.raises(ClipmoeError, match="LOCAL_RANK 2, but this machine has 2 GPU"):
        local_device(cuda, "2", gpus=2)


def test_progress_bar_redraws_rarely_in_a_log_file(tiny_shards, tmp_path, capsys):
    """On a terminal the bar redraws 10 times a second; in a log file every redraw stays as another line, so there
    it redraws every 30 s."""
    import io

    from clipmoe.progress import bar_interval, bar_intervals, log_file_defaults

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert bar_interval(Terminal()) == 0.1 and bar_interval(io.StringIO()) == 30.0
    # tqdm's monitor thread redraws every maxinterval (10 s) whatever mininterval says: both are set
    assert bar_intervals(io.StringIO()) == {"mininterval": 30.0, "maxinterval": 30.0}
    assert bar_intervals(Terminal()) == {"mininterval": 0.1, "maxinterval": 10.0}
    # the command line's other bars (zero-shot, shard writing) through the environment tqdm reads when it loads
    assert log_file_defaults(Terminal()) == {}
    check = ("import io, os; from clipmoe.progress import log_file_defaults; os.environ.update(log_file_defaults("
             "io.StringIO())); from tqdm.auto import tqdm; t = tqdm(file=io.StringIO()); "
             "print(t.mininterval, t.maxinterval)")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "30.0 30.0"
    train(_cfg(tiny_shards, tmp_path, steps=40), progress=True)  # pytest's stderr is not a terminal
    redraws = capsys.readouterr().err.count("\r")
    assert 1 <= redraws <= 4, redraws  # the start, the end (tqdm redraws at close), not every step


def test_sigterm_to_the_whole_job_with_loader_workers(tiny_shards, tmp_path):
    """SLURM, at a job's time limit, signals every process of the job: the training process and its loader workers.
    The workers leave the signal to the training process, which writes out the steps done with a checkpoint, ends
    them and exits 143 (killed by the signal, the workers used to fail it first: "DataLoader worker is killed by
    signal"; ended by it at any line, they once left it waiting forever on a lock of the loader)."""
    import re
    import subprocess
    import sys

    cfg = _cfg_dict(tiny_shards, tmp_path, steps=100_000, log_every=1, save_every=100_000)
    cfg["data"]["num_workers"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    job = subprocess.Popen([sys.executable, "-m", "clipmoe.cli", "train", str(tmp_path / "c.yaml")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 240
        while not (log.exists() and log.read_text().count("\n") >= 3) and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGTERM)  # the whole process group, as SLURM signals a job step
        _, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    said = re.fullmatch(r"clipmoe train: terminated \(SIGTERM\) after (\d+) of 100000 steps; its model: \S+; "
                        r"to continue: --resume (\S+)", err.strip().splitlines()[-1])
    assert job.returncode == 143 and said, err[-2000:]
    assert (tmp_path / said[2]).name == f"step_{int(said[1]):08d}" and (tmp_path / said[2]).is_dir()


def test_benchmarks_that_cannot_be_opened_stop_training_before_it_starts(tiny_shards, tmp_path):
    """`eval.zeroshot` datasets without a local copy: one error before the first step, not a failed evaluation
    after the whole run."""
    cfg = _cfg_dict(tiny_shards, tmp_path, steps=2)
    from PIL import Image

    (tmp_path / "bench" / "red").mkdir(parents=True)
    Image.new("RGB", (16, 16), (220, 30, 30)).save(tmp_path / "bench" / "red" / "0.png")
    cfg["eval"] = {"zeroshot": ["folder", "cifar10"], "data_root": str(tmp_path / "bench")}
    with pytest.raises(ClipmoeError, match=r"^eval.zeroshot: 1 of 2 datasets cannot be opened: cifar10: no local copy"):
        train(from_dict(RunConfig, cfg), progress=False)
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_cannot_be_made_is_one_error(tiny_shards, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ClipmoeError, match=r"^train.out_dir: cannot create .*file/run: Not a directory$"):
        train(_cfg(tiny_shards, tmp_path, steps=1, out_dir=str(tmp_path / "file" / "run")), progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_data_error_mid_run_keeps_the_steps_done(tmp_path, workers):
    """Data the loader cannot go on with (here a corrupt image in strict mode) after 3 steps: the 3 steps are
    written out as a run, with a checkpoint, and the error says where, as at Ctrl-C; not lost with the error. From
    a loader worker too, whose error torch wraps in the worker's traceback: still one line."""
    import webdataset as wds

    import loaders
    from loaders import DataError, synthetic

    shards = tmp_path / "shards"
    loaders.write_shards(synthetic.scenes(96, 0, "train", image_size=16), shards, samples_per_shard=32)
    with wds.TarWriter(str(shards / "00003.tar")) as sink:  # after the 3 good shards: a corrupt image
        sink.write({"__key__": "bad", "jpg": b"<html>not an image</html>", "txt": "a red circle"})
    cfg = _cfg_dict({"train": f"{shards}/{{00000..00003}}.tar"}, tmp_path, steps=10, log_every=1, save_every=100)
    cfg["data"].update(strict=True, shuffle=False, num_workers=workers)
    with pytest.raises(DataError) as caught:
        train(from_dict(RunConfig, cfg), progress=False)
    run = tmp_path / "run"
    assert str(caught.value).endswith(f"(training stopped after 3 of 10 steps; its model: {run / 'model.safetensors'}; "
                                      f"to continue: --resume {run / 'checkpoints' / 'step_00000003'})")
    assert str(caught.value).startswith("corrupt_image in ") and "\n" not in str(caught.value), caught.value
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert clipmoe.load(run / "model.safetensors").config.vision.moe.num_experts == 4


def test_a_training_checkpoint_is_a_model_to_evaluate(tiny_shards, tmp_path):
    """`resume.load_model` (and every command that takes --model) reads a checkpoint's model as of its step: its
    folder or its state.pt, also one written before checkpoints held the model's config."""
    from clipmoe import resume

    result = train(_cfg(tiny_shards, tmp_path, steps=4, save_every=2, keep_checkpoints=2), progress=False)
    steps = tmp_path / "run" / "checkpoints"
    final = result.model.state_dict()
    for ref in (steps / "step_00000004", steps / "step_00000004" / "state.pt"):
        loaded = resume.load_model(ref).state_dict()
        assert loaded.keys() == final.keys() and all(torch.equal(loaded[k], v) for k, v in final.items())
    earlier = resume.load_model(steps / "step_00000002").state_dict()
    assert not torch.equal(earlier["image.proj"], final["image.proj"])  # the weights of step 2, not the last
    texts = ["a red circle", "two blue squares"]
    assert torch.allclose(clipmoe.encode_text(texts, model=steps / "step_00000004"),
                          clipmoe.encode_text(texts, model=result.model), atol=1e-6)
    shared = torch.load(steps / "step_00000004" / "state.pt", weights_only=True)
    del shared["model_config"]  # as checkpoints were written before
    torch.save(shared, steps / "step_00000004" / "state.pt")
    assert torch.equal(resume.load_model(steps / "step_00000004").state_dict()["image.proj"], final["image.proj"])


def test_a_data_spec_that_cannot_feed_the_loader_is_an_error_before_the_model_is_built(tiny_shards, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr("clipmoe.train.create_model", lambda *a, **k: pytest.fail("the model was built"))
    d = _cfg_dict(tiny_shards, tmp_path, steps=2)
    for data, why in [({"train": f"{tiny_shards['train']}:0.5"}, "source weights .* apply when shards are drawn "
                                                                 "with replacement"),
                      ({"num_workers": 64}, "shards cannot feed 1 ranks x 64 workers")]:
        with pytest.raises(ClipmoeError, match=f"^data.train: .*{why}"):
            train(from_dict(RunConfig, {**d, "data": {**d["data"], **data}}), progress=False)


def test_data_that_yields_nothing_is_one_error_that_says_how_to_see_why(tiny_shards, tmp_path):
    cfg = _cfg_dict(tiny_shards, tmp_path, steps=2)
    cfg["data"]["train"] = "pipe:exit 3"  # a shard command that fails (a URL that does not answer, through curl)
    with pytest.raises(ClipmoeError, match=r"yielded no samples in epoch 0: .*'read_error': 1.*data\.strict: true"):
        train(from_dict(RunConfig, cfg), progress=False)
    cfg["data"]["strict"] = True
    with pytest.raises(loaders.DataError, match="read_error: pipe:exit 3: its command exited with status 3"):
        train(from_dict(RunConfig, cfg), progress=False)


def _limited_file_size(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (RLIMIT_FSIZE, as a full disk fails them with
    ENOSPC), instead of the process being killed by SIGXFSZ."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


@pytest.mark.slow  # 20-30 s: it waits out timeouts / starts two training processes
def test_writes_that_fail_cost_checkpoints_not_the_run(tiny_shards, tmp_path):
    """A checkpoint that cannot be written (a full disk) leaves no folder behind and a warning, and training goes
    on; outputs that cannot be written at the end are one line naming the folder."""
    cfg = _cfg_dict(tiny_shards, tmp_path, steps=4, log_every=1, save_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    model_bytes = 4 * sum(p.numel() for p in clipmoe.create_model(from_dict(RunConfig, cfg).model).parameters())
    # room for the model, not for a checkpoint's state (the model and AdamW's two moments)
    job = subprocess.run([sys.executable, "-m", "clipmoe.cli", "train", str(tmp_path / "c.yaml")], text=True,
                         capture_output=True, preexec_fn=_limited_file_size(2 * model_bytes), timeout=300)
    run = tmp_path / "run"
    assert job.returncode == 0, job.stderr[-2000:]
    warned = [line for line in job.stderr.splitlines() if "not written" in line]
    assert len(warned) == 2 and all("not written (the file could not be written in full; " in line and
                                    line.endswith("newest complete checkpoint is none") for line in warned), job.stderr
    assert list((run / "checkpoints").iterdir()) == []  # the partial folders are gone
    assert (run / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # no room for the model either: one line at the end
    cfg["train"].update(out_dir=str(tmp_path / "run2"), save_every=0)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    job = subprocess.run([sys.executable, "-m", "clipmoe.cli", "train", str(tmp_path / "c.yaml")], text=True,
                         capture_output=True, preexec_fn=_limited_file_size(model_bytes // 2), timeout=300)
    last = job.stderr.strip().splitlines()[-1]
    assert job.returncode == 2 and last.startswith(
        f"clipmoe train: error: the run's outputs could not all be written in {tmp_path / 'run2'} ("), job.stderr
    assert "File too large" in last and "Traceback" not in job.stderr


def test_metrics_log_rows_that_cannot_be_written_are_retried_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    script = f"""
import json, resource, warnings
from pathlib import Path
from clipmoe.train import _MetricsLog
rows = [{{"step": i, "note": "x" * 100}} for i in range(4)]
log = _MetricsLog(Path({str(path)!r}))
log.write(rows[:1])
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))  # room for part of the next row
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    log.write(rows[:2])
    log.write(rows[:3])
print(len(caught), caught[0].message)
print(Path({str(path)!r}).read_text().count(chr(10)), Path({str(path)!r}).stat().st_size)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
log.write(rows)
log.close()
"""
    job = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert job.returncode == 0, job.stderr
    said, kept = job.stdout.splitlines()
    assert said.startswith(f"1 {path}: rows not written (File too large; ") and said.endswith(
        "training goes on, and they are written once there is room")
    assert kept.split()[0] == "1" and int(kept.split()[1]) < 200  # the part of row 2 that fit was taken back
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": i, "note": "x" * 100}
                                                                          for i in range(4)]


def test_caption_key_and_crop_scale_reach_the_loader(tiny_shards, tmp_path, monkeypatch):
    """data.caption_key (a key.json field, or several) and data.crop_scale go to the training loader and its
    transform, and the caption key to the held-out loader; a field the shards lack is said, not trained on."""
    made = []

    def spy(urls, **kw):
        made.append(kw)
        return real(urls, **kw)

    real = loaders.image_text_loader
    monkeypatch.setattr(loaders, "image_text_loader", spy)
    d = _cfg_dict(tiny_shards, tmp_path, steps=2)
    d["data"].update(caption_key=["colour", "shape"], crop_scale=[0.5, 0.8], eval=tiny_shards["eval"])
    result = train(from_dict(RunConfig, d), progress=False)
    assert result.data_stats["skipped"] == {}
    assert [kw["caption_key"] for kw in made] == [["colour", "shape"]] * 2  # training, then validation
    assert made[0]["transform"].scale == (0.5, 0.8)
    d["data"].update(caption_key="no_such_field", eval=None)
    d["train"]["out_dir"] = str(tmp_path / "other")
    with pytest.raises(loaders.DataError, match="were bad"):
        train(from_dict(RunConfig, d), progress=False)
    for bad, why in [({"crop_scale": [0.9]}, "crop_scale: .* must be"), ({"crop_scale": [0.9, 0.5]}, "crop_scale"),
                     ({"caption_key": []}, "caption_key: .* must be a key"), ({"caption_key": 3}, "caption_key")]:
        with pytest.raises(ConfigError, match=f"data.{why}"):
            from_dict(RunConfig, {"data": bad})
