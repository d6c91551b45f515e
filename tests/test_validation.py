"""Validation on held-out shards (data.eval): `validate` against a computation by hand from the raw shard, and
its place in training (when it runs, what it logs and writes, how a missing held-out set is said)."""
import io
import json

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

import clipmoe
from clipmoe.config import RunConfig, from_dict
from clipmoe.train import train

validate = clipmoe.validate


def _micro(**overrides):
    torch.manual_seed(0)
    return clipmoe.create_model("clipmoe-micro", vision={"moe": {"num_experts": 4, "top_k": 2, "every": 1}},
                                **overrides).eval()


def _by_hand(model, urls, batch_size, kind="softmax"):
    """Loss (batches of batch_size in shard order, weighted by size) and recall@k, from the raw samples."""
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    _, transform = clipmoe.create_transforms(model.config)
    tokenizer = clipmoe.get_tokenizer(model)
    images = torch.stack([transform(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])
    tokens = tokenizer([s["txt"].decode() for s in samples])
    total, feats_i, feats_t = 0.0, [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            out = model(images[i:i + batch_size], tokens[i:i + batch_size])
            logits = out.logit_scale * out.image_features @ out.text_features.T
            n = len(logits)
            if kind == "sigmoid":
                labels = 2 * torch.eye(n) - 1
                loss = -F.logsigmoid(labels * (logits + out.logit_bias)).sum() / n
            else:
                loss = (F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(logits.T, torch.arange(n))) / 2
            total += loss.item() * n
            feats_i.append(out.image_features)
            feats_t.append(out.text_features)
    scores = torch.cat(feats_t) @ torch.cat(feats_i).T  # (text, image); pair j is text j with image j
    own = scores.diagonal()
    image_rank = (scores > own[:, None]).sum(1)  # images closer to caption j than its own
    text_rank = (scores.T > own[:, None]).sum(1)  # captions closer to image j than its own
    recalls = {f"{what}_retrieval_recall@{k}": (rank < k).float().mean().item()
               for k in (1, 5, 10) for what, rank in (("image", image_rank), ("text", text_rank))}
    return total / len(samples), recalls, len(samples)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_validate_equals_a_computation_by_hand(tiny_shards, tmp_path, kind):
    model = _micro(init_logit_bias=-5.0) if kind == "sigmoid" else _micro()
    res = validate(model, tiny_shards["eval"], batch_size=24, loss_kind=kind)  # batches of 24, 24 and 16
    loss, recalls, n = _by_hand(model, tiny_shards["eval"], 24, kind)
    assert res["num_samples"] == n == 64 and res["skipped"] == {}
    assert abs(res["loss"] - loss) < 1e-4
    for k, v in recalls.items():
        assert abs(res[k] - v) < 1e-6, k
    assert not model.training
    # the loss depends on the batch (its negatives); the recalls do not
    whole = validate(model, tiny_shards["eval"], batch_size=64, loss_kind=kind)
    assert whole["loss"] != res["loss"] and all(whole[k] == res[k] for k in recalls)
    assert validate(model, tiny_shards["eval"], batch_size=16, max_samples=20)["num_samples"] == 32
    # more workers than the one shard: one reader, the same numbers
    assert validate(model, tiny_shards["eval"], batch_size=24, loss_kind=kind, num_workers=2) == res
    # a saved model by its path, as the command takes it
    path = clipmoe.save(model, tmp_path / "model.safetensors")
    assert validate(str(path), tiny_shards["eval"], batch_size=24, loss_kind=kind) == res


def test_validation_during_training(tiny_shards, tmp_path):
    cfg = from_dict(RunConfig, {
        "model": {"arch": "clipmoe-micro"},
        "data": {"train": tiny_shards["train"], "eval": tiny_shards["eval"], "batch_size": 32},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"steps": 8, "log_every": 2, "out_dir": str(tmp_path / "run")},
        "eval": {"every": 4},
    })
    result = train(cfg, progress=False)
    assert [v["step"] for v in result.validation] == [3, 7]
    # the trained model's own numbers
    again = validate(result.model, tiny_shards["eval"], batch_size=32)
    assert abs(again["loss"] - result.validation[-1]["loss"]) < 1e-5
    assert result.history[-1]["val"]["loss"] == result.validation[-1]["loss"]
    assert json.loads(result.files["validation"].read_text()) == result.validation
    logged = [json.loads(line) for line in result.files["metrics"].read_text().splitlines()]
    assert [row["step"] for row in logged if "val" in row] == [7]  # step 3 has no log row (log_every 2)

    # held-out data that breaks during the run: an error entry and a warning; the training goes on
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 64)
    cfg.data.eval = str(broken)
    cfg.train.out_dir = str(tmp_path / "run2")
    with pytest.warns(UserWarning, match="data.eval at step [37]: validation: no readable samples .*truncated_shard"):
        result = train(cfg, progress=False)
    assert result.steps == 8 and [set(v) for v in result.validation] == [{"step", "error"}] * 2
    assert result.files["loss_plot"].stat().st_size > 0

    cfg.data.eval = str(tmp_path / "nowhere" / "{0..3}.tar")
    with pytest.raises(clipmoe.ClipmoeError, match="^data.eval: none of the shards"):
        train(cfg, progress=False)


def test_validate_command(tiny_shards, tmp_path, capsys):
    from clipmoe.cli import main

    model = _micro()
    clipmoe.save(model, tmp_path / "m.safetensors")
    args = ["validate", "--model", str(tmp_path / "m.safetensors"), "--data", tiny_shards["eval"],
            "--batch-size", "24"]
    assert main(args + ["--out", str(tmp_path / "out" / "v.json")]) == 0
    printed = capsys.readouterr().out
    expected = validate(model, tiny_shards["eval"], batch_size=24)
    written = json.loads((tmp_path / "out" / "v.json").read_text())
    assert written.keys() == expected.keys() and written["skipped"] == expected["skipped"] == {}
    assert all(written[k] == pytest.approx(v, abs=1e-6) for k, v in expected.items() if k != "skipped")
    assert f"held out (64 pairs): loss {expected['loss']:.4g}, recall@1/5/10 image " in printed
    assert main(args + ["--loss", "sigmoid"]) == 2  # a model without a logit bias
    assert "the sigmoid loss needs a model with a logit bias" in capsys.readouterr().err
    assert main(["validate", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "{0..3}.tar")]) == 2
    assert capsys.readouterr().err.startswith("clipmoe validate: error: --data: none of the shards")


def test_validate_missing_shards_leave_a_training_model_training(tmp_path):
    model = _micro().train()
    with pytest.raises(ValueError, match="none of the shards"):  # loaders.sources.SpecError
        validate(model, str(tmp_path / "missing-{0..1}.tar"))
    assert model.training
