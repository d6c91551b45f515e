"""The main job end to end: shards -> MoE CLIP pretraining on the CPU -> zero-shot evaluation."""
import json

import pytest

import clipmoe
from clipmoe.quickstart import EVAL_ATTRIBUTES, make_data, quickstart


@pytest.mark.slow
def test_quickstart_reaches_three_times_chance(tmp_path):
    """The quickstart end to end (its data, model and evaluation), on a 200-step schedule instead of 600 so that
    the test run stays short on slow CPUs (a 2-core AVX2 machine: 182 s, top-1 at 5.6x and 4.9x chance)."""
    summary = quickstart(tmp_path, overrides=["train.steps=200"], progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(EVAL_ATTRIBUTES) and len(results) >= 2
    for attr, r in results.items():
        assert r["chance"] == pytest.approx(1 / len(EVAL_ATTRIBUTES[attr]))
        assert r["top1"] >= 3 * r["chance"], (attr, r)
    assert summary["data"]["skipped"] == {}
    # the held-out pairs, validated at the end: recall@10 among 1,000 far above chance (1%; 34% and 41% at 200 steps)
    held_out = summary["validation"]
    assert held_out["step"] == 199 and held_out["num_samples"] == 1000
    assert held_out["image_retrieval_recall@10"] > 0.15 and held_out["text_retrieval_recall@10"] > 0.15, held_out
    model = clipmoe.load(tmp_path / "run" / "model.safetensors")
    assert model.config.vision.moe is not None and model.config.text.moe is not None
    for name in ("loss.png", "expert_load.png", "metrics.jsonl", "validation.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    # the training data are shards in the img2dataset layout, with their manifest
    assert (tmp_path / "shards" / "train" / "00000_stats.json").is_file()
    assert json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())["num_samples"] == 24_000


def test_make_data_takes_a_string_path(tmp_path):
    train, ev = make_data(str(tmp_path / "shards"), train_samples=20, eval_samples=6, shards=2, progress=False)
    assert train == f"{tmp_path}/shards/train/{{00000..00001}}.tar"
    assert ev == f"{tmp_path}/shards/eval/00000.tar"
    counts = [json.loads(p.read_text())["num_samples"] for p in [tmp_path / "shards" / "train" / "manifest.json",
                                                                   tmp_path / "shards" / "eval" / "manifest.json"]]
    assert counts == [20, 6]


def test_a_rerun_replaces_its_own_previous_run(tmp_path, monkeypatch, capsys):
    """A second `clipmoe quickstart --out DIR` starts over in DIR/run (a run folder elsewhere would be refused)."""
    from clipmoe import quickstart as qs
    monkeypatch.setattr(qs, "make_data", lambda out, seed=0, progress=True: make_data(
        out, seed, train_samples=128, eval_samples=32, progress=progress))
    for _ in range(2):
        quickstart(tmp_path, overrides=["train.steps=2", "data.batch_size=16", "train.save_every=1"], progress=False)
    assert "replacing the previous run" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002"]
