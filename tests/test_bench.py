"""The benchmark scripts still run (tiny sizes; the numbers themselves are never asserted)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_layer_bench_runs_and_profiles(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/bench/moe_layer.py", "--tokens", "64", "--dtypes", "fp32", "--ks", "2",
         "--cfs", "1.25", "--reps", "1", "--inputs", "1", "--back-to-back", "--profile", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.split()[:2] == ["64", "fp32"]]
    assert len(rows) == 1 and "back to back" in out.stdout
    assert "== ours" in (tmp_path / "64_fp32_k2_1.25.txt").read_text()


def test_train_step_bench_runs():
    out = subprocess.run(
        [sys.executable, "scripts/bench/train_step.py", "--arch", "clipmoe-micro", "--batch", "4", "--steps", "1",
         "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train step ms: eager" in out.stdout


def test_grad_checkpointing_bench_runs():
    out = subprocess.run(
        [sys.executable, "scripts/bench/grad_checkpointing.py", "--arch", "clipmoe-micro", "--batch", "2",
         "--reps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "plain" in out.stdout and "checkpointed" in out.stdout


def test_expert_parallel_bench_runs():
    out = subprocess.run(
        [sys.executable, "scripts/bench/expert_parallel.py", "--tokens", "64", "--reps", "1", "--ks", "2",
         "--cfs", "1.25"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.split()[:2] == ["2", "1.25"]]
    assert len(rows) == 1, out.stdout
