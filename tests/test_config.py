"""Run configs: YAML -> base: -> --set -> validated dataclasses, with errors that name the key."""
from pathlib import Path

import pytest
import torch

import clipmoe
from clipmoe.config import RunConfig, from_dict, load_run_config
from clipmoe.errors import ConfigError
from clipmoe.moe import MoE
from clipmoe.quickstart import QUICKSTART

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_run_config(CONFIGS / name)
    model_cfg = clipmoe.get_model_config(cfg.model.arch, cfg.model.overrides)
    assert model_cfg.name == cfg.model.arch


def test_moe_configs_place_experts_as_documented():
    for name, arch in [("vit-b-32-moe.yaml", "ViT-B-32"), ("vit-b-16-moe.yaml", "ViT-B-16")]:
        cfg = load_run_config(CONFIGS / name)
        m = clipmoe.get_model_config(cfg.model.arch, cfg.model.overrides)
        assert m.name == arch
        for tower in (m.vision, m.text):
            assert tower.moe.num_experts == 8 and tower.moe.top_k == 2
            assert tower.moe.moe_blocks(tower.depth) == [1, 3, 5, 7, 9, 11]


def test_quickstart_yaml_matches_embedded_default():
    assert load_run_config(CONFIGS / "quickstart.yaml") == from_dict(RunConfig, QUICKSTART)


def test_create_model_from_a_run_configs_model_section():
    section = load_run_config(CONFIGS / "quickstart.yaml").model
    model = clipmoe.create_model(section)
    assert model.config.name == "clipmoe-tiny" and model.config.vision.moe.num_experts == 4
    # overrides given to create_model apply on top of the section's
    model = clipmoe.create_model(section, vision={"moe": {"num_experts": 2}})
    assert model.config.vision.moe.num_experts == 2 and model.config.vision.moe.top_k == 2
    assert model.config.text.moe.num_experts == 4
    with pytest.raises(clipmoe.ClipmoeError, match="not dict"):
        clipmoe.create_model({"arch": "clipmoe-tiny"})


def test_base_derivation_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 5, seed: 3}\noptim: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {steps: 7}\n")
    cfg = load_run_config(tmp_path / "b.yaml",
                          ["optim.lr=2e-3", "data.batch_size=4", "model.overrides.quick_gelu=true"])
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.lr, cfg.data.batch_size) == (7, 3, 2e-3, 4)
    assert clipmoe.get_model_config("clipmoe-micro", cfg.model.overrides).quick_gelu is True


@pytest.mark.parametrize("text,overrides,key", [
    ("train: {stepz: 5}", [], "train.stepz"),
    ("train: {steps: five}", [], "train.steps"),
    ("train: {steps: 0}", [], "train.steps"),
    ("optim: {lr: -1}", [], "optim.lr"),
    ("train: {precision: fp8}", [], "train.precision"),
    ("data: {batch_size: 2.5}", [], "data.batch_size"),
    ("", ["train.log_every=true"], "train.log_every"),
    ("", ["nosuch.key=1"], "nosuch"),
    ("train: [1, 2]", [], "train"),
    ("data: {resampled: true}", [], "data.samples_per_epoch"),
    ("loss: {kind: sigmoid, dist_impl: ring}", [], "loss.dist_impl"),
    ("loss: {dist_impl: bidir}", [], "loss.dist_impl"),  # the softmax loss has one way
])
def test_bad_values_name_the_key(tmp_path, text, overrides, key):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(clipmoe.ConfigError) as e:
        load_run_config(tmp_path / "c.yaml", overrides)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,hint", [
    ("data: {batch_szie: 8}", "data.batch_szie: unknown key (did you mean data.batch_size?)"),
    ("train: {lr: 0.1}", "train.lr: unknown key (is it optim.lr?)"),
    ("batch_size: 8", "batch_size: unknown key (is it data.batch_size or eval.batch_size?)"),
    ("model: {image: {width: 64}}", "model.image: unknown key (is it model.overrides.vision?)"),
    ("model: {overrides: {image: {width: 64}}}", "model.overrides.image: unknown key (did you mean "
                                                 "model.overrides.vision?)"),
    ("model: {overrides: {moe: {top_k: 2}}}", "model.overrides.moe: unknown key (is it model.overrides.vision.moe "
                                              "or model.overrides.text.moe?)"),
    ("model: {overrides: {text: {moe: {topk: 2}}}}", "model.overrides.text.moe.topk: unknown key (did you mean "
                                                     "model.overrides.text.moe.top_k?)"),
    ("optim: {step: 2}", "optim.step: unknown key (expected one of: beta1, "),  # no guess when nothing is near
])
def test_unknown_keys_get_a_guess(tmp_path, text, hint):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(clipmoe.ConfigError) as e:
        cfg = load_run_config(tmp_path / "c.yaml")
        clipmoe.get_model_config(cfg.model.arch, cfg.model.overrides)
    assert str(e.value).startswith(hint)


@pytest.mark.parametrize("overrides,key", [
    ({"vision": {"moe": {"top_k": 9}}}, "model.overrides.vision.moe.top_k"),
    ({"text": {"moe": {"capacity_factor": 0}}}, "model.overrides.text.moe.capacity_factor"),
    ({"vision": {"patch_size": 7}}, "model.overrides.vision.image_size"),
    ({"text": {"num_heads": 5}}, "model.overrides.text.width"),
    ({"vision": {"moe": {"routerz": "x"}}}, "model.overrides.vision.moe.routerz"),
])
def test_model_overrides_validated(overrides, key):
    with pytest.raises(clipmoe.ConfigError) as e:
        clipmoe.get_model_config("clipmoe-micro", overrides)
    assert str(e.value).startswith(key)


def test_broken_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {steps: [}\n")
    with pytest.raises(clipmoe.ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
    with pytest.raises(clipmoe.ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(clipmoe.ConfigError, match="loops"):
        load_run_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("text", ["data: {train: s/{00000..00007}.tar}", "data:\n  train: {00000..00007}\n"])
def test_an_unquoted_shard_range_is_named(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(clipmoe.ConfigError, match="quote a value holding a shard range"):
        load_run_config(tmp_path / "c.yaml")
    (tmp_path / "ok.yaml").write_text("data: {train: 'quoted/{0..1}.tar'}\n")
    assert load_run_config(tmp_path / "ok.yaml", ["data.eval={00000..00003}"]).data.eval == "{00000..00003}"


def test_moe_placement_options():
    from clipmoe.config import MoEConfig

    assert MoEConfig(every=2).moe_blocks(6) == [1, 3, 5]
    assert MoEConfig(every=3).moe_blocks(6) == [2, 5]
    assert MoEConfig(last=2).moe_blocks(6) == [4, 5]
    assert MoEConfig(blocks=[0, 4, 4]).moe_blocks(6) == [0, 4]
    with pytest.raises(clipmoe.ConfigError, match=r"^model.overrides.vision.moe.blocks: \[5\] has indices"):
        clipmoe.create_model("clipmoe-micro", vision={"moe": {"blocks": [5]}})
    # asking for MoE layers and getting none is an error, not a silently dense tower
    for moe, key in [({"every": 3}, "every"), ({"blocks": []}, "blocks")]:
        with pytest.raises(clipmoe.ConfigError, match=rf"moe.{key}: .* places no MoE layer in a tower of 2 blocks"):
            clipmoe.create_model("clipmoe-micro", text={"moe": moe})
    with pytest.raises(clipmoe.ClipmoeError, match="places no MoE layer"):
        clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), every=3)
    # more blocks than the tower has is a config for another tower, not "all of them"
    model = clipmoe.create_model("clipmoe-micro", text={"moe": {"last": 2}})
    assert sum(isinstance(m, MoE) for m in model.text.modules()) == 2
    with pytest.raises(clipmoe.ConfigError, match=r"moe.last: 3 is more than the tower's 2 blocks"):
        clipmoe.create_model("clipmoe-micro", text={"moe": {"last": 3}})
    with pytest.raises(clipmoe.ClipmoeError, match="more than the tower's 2 blocks"):
        clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), last=3)
    # two placements that disagree are an error, not one of them silently
    with pytest.raises(clipmoe.ConfigError, match=r"^model.overrides.text.moe.blocks: \[0\] and last \(1\) both"):
        clipmoe.create_model("clipmoe-micro", text={"moe": {"last": 1, "blocks": [0]}})
    with pytest.raises(clipmoe.ClipmoeError, match=r"blocks: \[1\] and last \(2\) both place the MoE layers"):
        clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), last=2, blocks=[1])


def test_per_block_settings(tmp_path):
    """`moe.per_block`: some MoE layers of a tower route differently; keys are block indices (numbers from YAML,
    strings from JSON and --set), values any MoE field but the placement, each checked in the layer's settings."""
    import json

    from clipmoe.config import ModelConfig, MoEConfig, to_dict

    (tmp_path / "c.yaml").write_text(
        "model:\n  arch: clipmoe-micro\n  overrides:\n    vision:\n      moe:\n        num_experts: 4\n"
        "        every: 1\n        per_block:\n          1: {top_k: 1, capacity_factor: null}\n"
        "    text: {moe: {last: 1}}\n")
    overrides = ["model.overrides.vision.moe.per_block.1.k1_gate=straight_through",  # into the YAML's block 1
                 "model.overrides.vision.moe.per_block.0.router=expert_choice"]  # a block of its own
    cfg = load_run_config(tmp_path / "c.yaml", overrides)
    model = clipmoe.create_model(cfg.model)
    moe = model.config.vision.moe
    assert moe.per_block == {0: {"router": "expert_choice"},
                             1: {"top_k": 1, "capacity_factor": None, "k1_gate": "straight_through"}}
    layers = [b.mlp.cfg for b in model.image.blocks]
    assert [(c.router, c.top_k, c.capacity_factor, c.k1_gate, c.num_experts) for c in layers] == [
        ("expert_choice", 2, 1.25, "multiply", 4), ("topk", 1, None, "straight_through", 4)]
    assert all(c.per_block is None for c in layers)  # a layer's settings are its own
    assert model.text.blocks[1].mlp.cfg.top_k == 2  # the text tower has settings of its own
    # JSON (a checkpoint's config) turns the keys into strings: read back, the config is the same
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(model.config)))) == model.config
    # the layers' shapes may differ too: a forward and backward through both kinds
    model = clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 4, "every": 1, "per_block": {
        1: {"num_experts": 2, "expert_mlp_ratio": 1.0}}}}, text={"moe": {"last": 1}})
    assert [tuple(b.mlp.experts.w1.shape) for b in model.image.blocks] == [(4, 32, 128), (2, 32, 32)]
    out = model(torch.randn(2, 3, 16, 16), clipmoe.get_tokenizer(model)(["a b", "c"]))
    assert [len(r["tokens_per_expert"]) for r in clipmoe.moe_report(out)] == [4, 2, 8]
    (out.image_features.sum() + out.text_features.sum()).backward()
    assert model.image.blocks[1].mlp.experts.w1.grad.abs().sum() > 0
    with pytest.raises(clipmoe.ConfigError, match=r"^per_block.1.top_k: 3 must be in 1..num_experts \(2\)$"):
        MoEConfig(num_experts=4, per_block={1: {"num_experts": 2, "top_k": 3}})


@pytest.mark.parametrize("per_block,error", [
    ({5: {"top_k": 1}}, r"model.overrides.vision.moe.per_block: \[5\] names blocks without an MoE layer "
                        r"\(this tower's: \[1\]\)"),
    ({1: {"blocks": [0]}}, r"model.overrides.vision.moe.per_block.1.blocks: \[0\] places the MoE layers"),
    ({1: {"top_k": 9}}, r"model.overrides.vision.moe.per_block.1.top_k: 9 must be in 1..num_experts \(8\)"),
    ({1: {"topk": 1}}, r"model.overrides.vision.moe.per_block.1.topk: unknown key \(did you mean "
                       r"per_block.1.top_k\?\)"),
    ({1: {"capacity_factor": "lots"}}, r"model.overrides.vision.moe.per_block.1.capacity_factor: expected a number"),
    ({"last": {"top_k": 1}}, r"model.overrides.vision.moe.per_block: 'last' is not a block index"),
    ({1: 3}, r"model.overrides.vision.moe.per_block.1: 3 must be a mapping of MoE settings"),
    ([1], r"model.overrides.vision.moe.per_block: expected a mapping"),
])
def test_per_block_errors_name_the_key(per_block, error):
    with pytest.raises(clipmoe.ConfigError, match="^" + error):
        clipmoe.create_model("clipmoe-micro", vision={"moe": {"per_block": per_block}})


def test_python_arguments_of_the_wrong_type_name_the_field():
    """From Python (no YAML type check on the way), an integer field given a float or a bool is one error naming
    it, not a TypeError from inside torch."""
    from clipmoe.config import MoEConfig, VisionConfig

    dense = clipmoe.create_model("clipmoe-micro")
    for kwargs, key in [({"num_experts": 4.5}, "num_experts"), ({"top_k": 1.0}, "top_k"), ({"last": 1.5}, "last"),
                        ({"num_experts": True}, "num_experts")]:
        with pytest.raises(clipmoe.ClipmoeError, match=rf"^{key}: .* must be an integer$"):
            clipmoe.upcycle(dense, **{"num_experts": 4, **kwargs})
    with pytest.raises(clipmoe.ConfigError, match=r"^min_capacity: 2.0 must be an integer$"):
        MoEConfig(min_capacity=2.0)
    with pytest.raises(clipmoe.ConfigError, match=r"^depth: 2.0 must be an integer$"):
        VisionConfig(width=64, depth=2.0, num_heads=2)


@pytest.mark.parametrize("optim", [{"schedule": "cosine"}, {"schedule": "const"},
                                   {"schedule": "const-cooldown", "cooldown_steps": 30},
                                   {"schedule": "const-cooldown", "cooldown_steps": 30, "cooldown_power": 0.5,
                                    "cooldown_end_lr": 1e-5}])
def test_lr_schedules_are_open_clips(optim):
    """Every step's learning rate equals what open_clip's scheduler of the same name assigns."""
    from open_clip_train import scheduler

    from clipmoe.train import build_optimizer

    cfg = from_dict(RunConfig, {"optim": {"lr": 1e-3, "warmup_steps": 10, **optim}, "train": {"steps": 100}})
    opt, sched = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, cfg.train.steps)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    args = (ref_opt, 1e-3, 10, 100)
    ref = {"cosine": lambda: scheduler.cosine_lr(*args), "const": lambda: scheduler.const_lr(*args),
           "const-cooldown": lambda: scheduler.const_lr_cooldown(
               *args, 30, optim.get("cooldown_power", 1.0), optim.get("cooldown_end_lr", 0.0))}[optim["schedule"]]()
    for step in range(100):
        assert sched.get_last_lr()[0] == pytest.approx(ref(step), rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_lr_schedule_errors():
    for optim, train, why in [({"schedule": "linear"}, {}, "optim.schedule: 'linear' must be"),
                              ({"schedule": "const-cooldown"}, {}, "cooldown_steps: 0 must be >= 1 with schedule"),
                              ({"cooldown_steps": 5}, {},
                               "cooldown_steps: 5 must be >= 1 with schedule const-cooldown, and 0 with another"),
                              ({"schedule": "const-cooldown", "cooldown_steps": 95, "warmup_steps": 10},
                               {"steps": 100}, r"cooldown_steps: 95 after optim.warmup_steps \(10\) do not fit"),
                              ({"cooldown_end_lr": 1.0, "lr": 0.1}, {}, r"cooldown_end_lr: 1.0 must be in \[0, lr")]:
        with pytest.raises(ConfigError, match=why):
            from_dict(RunConfig, {"optim": optim, "train": train})


def test_a_layer_on_its_own_takes_its_blocks_per_block_entry():
    cfg = {"num_experts": 4, "top_k": 2, "per_block": {3: {"num_experts": 2, "top_k": 1, "shared_expert": True}}}
    layer = MoE(16, 32, cfg, block=3)
    assert (layer.cfg.num_experts, layer.cfg.top_k, layer.cfg.per_block) == (2, 1, None)
    assert layer.experts.w1.shape == (2, 16, 32) and layer.router.weight.shape == (2, 16) and layer.shared is not None
    other = MoE(16, 32, cfg, block=1)
    assert (other.cfg.num_experts, other.cfg.top_k, other.shared) == (4, 2, None)
