"""The console script: thin, with one-line errors."""
import json
import subprocess
import sys

import clipmoe


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
