"""Gradient accumulation (train.accum_freq) against the same loss computed on all micro-batches at once, and in
training against one batch of the total size."""
import contextlib

import pytest
import torch

import clipmoe
from clipmoe.accumulation import accumulated_backward
from clipmoe.config import EntropyLossConfig, LossConfig, RunConfig, from_dict
from clipmoe.loss import total_loss
from clipmoe.model import CLIPOutput
from clipmoe.train import train


def _model(**overrides):
    """An MoE CLIP whose image tower draws random numbers in training: router jitter and patch dropout."""
    torch.manual_seed(0)
    return clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 4, "top_k": 2, "jitter": 0.2},
                                                         "patch_dropout": 0.5},
                                text={"moe": {"num_experts": 4, "top_k": 1, "capacity_factor": 1.0}},
                                **overrides).train()


def _inputs(model, n, b):
    g = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    images = torch.randn(n, b, 3, size, size, generator=g)
    words = ["red", "blue", "square", "a", "small", "circle", "on", "green"]
    texts = [" ".join(words[int(i)] for i in torch.randint(0, 8, (int(k),), generator=g))
             for k in torch.randint(1, 9, (n * b,), generator=g)]  # padding differs between captions
    tokens = clipmoe.get_tokenizer(model)(texts).view(n, b, -1)
    return list(zip(images, tokens))


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def check_accumulation(model, inputs, cfg, device):
    """The summed gradients of `accumulated_backward` over `inputs` (micro-batches) equal those of one backward
    through all of them (drawing the same random numbers in the same order) of the contrastive loss over all pairs
    plus each micro-batch's auxiliary terms averaged; the logged terms are that loss's."""
    n = len(inputs)
    torch.manual_seed(7)
    outs = [model(*x) for x in inputs]
    whole = CLIPOutput(torch.cat([o.image_features for o in outs]), torch.cat([o.text_features for o in outs]),
                       outs[0].logit_scale, logit_bias=outs[0].logit_bias)
    contrastive = total_loss(whole, cfg)["contrastive"]
    parts = [total_loss(o, cfg) for o in outs]
    aux = sum(p["loss"] - p["contrastive"] for p in parts) / n
    (contrastive + aux).backward()
    expected, after = _grads(model), torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    terms, got_outs = accumulated_backward(lambda j: model(*inputs[j]), n, cfg, torch.Tensor.backward,
                                           contextlib.nullcontext, device)
    got = _grads(model)
    assert got.keys() == expected.keys() and "logit_scale" in got and "image.blocks.1.mlp.router.weight" in got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(torch.get_rng_state(), after)  # the random stream goes on as after one pass
    assert terms["contrastive"].item() == pytest.approx(contrastive.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx((contrastive + aux).item(), rel=1e-6)
    for name in ("balance", "z", "image_local_entropy", "image_global_entropy"):
        assert terms[name].item() == pytest.approx(sum(p[name].item() for p in parts) / n, rel=1e-5), name
    assert len(got_outs) == n and all(len(o.aux) == len(outs[0].aux) for o in got_outs)


LOSS = dict(balance_coef=0.1, z_coef=0.01, image_entropy=EntropyLossConfig(local_coef=0.1, global_coef=0.1))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_accumulated_gradient_is_the_whole_batch_gradient(kind):
    """3 micro-batches of 4, MoE in both towers with router jitter and patch dropout (random draws), capacity drops,
    balance, z and entropy losses, as one batch of 12 (check_accumulation)."""
    model = _model(init_logit_bias=-5.0) if kind == "sigmoid" else _model()
    check_accumulation(model, _inputs(model, 3, 4), LossConfig(kind=kind, **LOSS), torch.device("cpu"))


def _run(tiny_shards, tmp_path, name, batch_size, accum_freq):
    return train(from_dict(RunConfig, {
        "model": {"arch": "clipmoe-micro", "overrides": {
            "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 1, "capacity_factor": None}},
            "text": {"moe": {"num_experts": 4, "top_k": 1, "every": 2, "capacity_factor": None}}}},
        "data": {"train": tiny_shards["train"], "batch_size": batch_size},
        "loss": {"balance_coef": 0.0, "z_coef": 0.0},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"steps": 3, "log_every": 1, "out_dir": str(tmp_path / name), "accum_freq": accum_freq},
    }), progress=False)


def test_training_with_accumulation_equals_one_batch_of_the_total_size(tiny_shards, tmp_path):
    """2 batches of 32 a step train as batches of 64 (dropless layers, whose routing does not depend on the batch,
    and no auxiliary loss, which is computed per batch): the same losses and weights after 3 steps; 4 batches of 16
    differ only in the auxiliary terms' batch."""
    whole = _run(tiny_shards, tmp_path, "whole", 64, 1)
    halves = _run(tiny_shards, tmp_path, "halves", 32, 2)
    assert [r["contrastive"] for r in halves.history] == pytest.approx([r["contrastive"] for r in whole.history],
                                                                      rel=1e-5)
    for (name, a), b in zip(whole.model.state_dict().items(), halves.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
    assert halves.data_stats == whole.data_stats and halves.history[-1]["speed"]["samples_per_s"] > 0
    plain = _run(tiny_shards, tmp_path, "plain", 32, 1)  # the same first batch of 32 alone: another step
    assert plain.history[0]["contrastive"] != pytest.approx(whole.history[0]["contrastive"], rel=1e-3)


def test_accum_freq_is_checked():
    for bad, why in [({"accum_freq": 0}, "must be >= 1"),
                     ({"accum_freq": 2, "deepspeed": {}}, "not supported under train.deepspeed"),
                     ({"accum_freq": 2, "cuda_graphs": True}, "cannot be combined with cuda_graphs")]:
        with pytest.raises(clipmoe.ConfigError, match=f"accum_freq.*{why}"):
            from_dict(RunConfig, {"train": bad})


def test_accumulating_run_resumes_exactly(tiny_shards, tmp_path):
    """4 steps of 2 x 16 with router jitter equal 2 steps, a checkpoint, and 2 more from it, bit for bit: the
    checkpoint holds the data position after the step's last batch and the random state after its replays."""
    def cfg(out, **train_kw):
        return from_dict(RunConfig, {
            "model": {"arch": "clipmoe-micro", "overrides": {
                "vision": {"moe": {"num_experts": 4, "top_k": 2, "every": 1, "jitter": 0.1}}}},
            "data": {"train": tiny_shards["train"], "batch_size": 16},
            "optim": {"lr": 2e-3, "warmup_steps": 1},
            "train": {"steps": 4, "log_every": 1, "out_dir": str(tmp_path / out), "accum_freq": 2, **train_kw}})

    straight = train(cfg("a", save_every=2, keep_checkpoints=2), progress=False)
    resumed = train(cfg("b", resume=str(tmp_path / "a" / "checkpoints" / "step_00000002")), progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.data_stats == resumed.data_stats and straight.data_stats["samples"] == 4 * 2 * 16
