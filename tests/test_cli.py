"""The console script: thin, with one-line errors."""
import json
import subprocess
import sys

import torch

import clipmoe
from clipmoe.moe import MoE


def _run(*args):
    return subprocess.run([sys.executable, "-m", "clipmoe.cli", *args], capture_output=True, text=True, timeout=300)


def test_upcycle_and_encode(tmp_path):
    dense = clipmoe.save(clipmoe.create_model("clipmoe-micro"), tmp_path / "dense.safetensors")
    out = tmp_path / "moe.safetensors"
    r = _run("upcycle", str(dense), str(out), "--experts", "4", "--top-k", "2", "--every", "1")
    assert r.returncode == 0, r.stderr
    cfg = clipmoe.load(out).config
    assert cfg.vision.moe.num_experts == 4 and cfg.text.moe.moe_blocks(cfg.text.depth) == [0, 1]
    r = _run("encode", "--model", str(out), "--text", "a red square", "two circles")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and len(rows[0]) == 32
    expected = clipmoe.encode_text(["a red square", "two circles"], model=out)
    assert max(abs(a - b) for a, b in zip(rows[1], expected[1].tolist())) < 1e-5


def test_errors_are_one_line(tmp_path):
    r = _run("encode", "--model", str(tmp_path / "none.safetensors"), "--text", "x")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model not found" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    r = _run("upcycle", str(bad), str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0


def test_analyze_routing_writes_heatmap_and_words(tmp_path, tiny_shards):
    from clipmoe.analysis import analyze_routing

    model = clipmoe.upcycle(clipmoe.create_model("clipmoe-micro"), num_experts=3, every=1, noise_std=0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_()
    report = analyze_routing(model, tiny_shards["eval"], tmp_path, num_batches=2, batch_size=16)
    assert set(report) == {"image.0", "image.1", "text.0", "text.1"}
    for name, entry in report.items():
        assert abs(sum(entry["load"]) - 1) < 1e-5
    words = [w for top in report["text.0"]["top_words"] for w, _ in top]
    assert words and all(isinstance(w, str) and w for w in words)
    assert len(report["image.0"]["patch_map"]) == 3 and len(report["image.0"]["patch_map"][0]) == 2 * 2 + 1
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "routing.json").read_text()).keys() == report.keys()
    # and through the console script
    path = clipmoe.save(model, tmp_path / "m.safetensors")
    r = _run("analyze-routing", "--model", str(path), "--data", tiny_shards["eval"], "--out", str(tmp_path / "cli"),
             "--batches", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "routing.png").is_file() and "expert 0:" in r.stdout
