"""The benchmark scripts still run (tiny sizes; the numbers themselves are never asserted)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    """Runs scripts/bench/SCRIPT with ARGS from the project root; its stdout."""
    out = subprocess.run([sys.executable, f"scripts/bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_moe_layer_bench_runs_and_profiles(tmp_path):
    stdout = _bench("moe_layer.py", "--tokens", "64", "--dtypes", "fp32", "--ks", "2", "--cfs", "1.25", "--reps", "1",
                    "--inputs", "1", "--back-to-back", "--profile", str(tmp_path), "--parts")
    rows = [line for line in stdout.splitlines() if line.split()[:2] == ["64", "fp32"]]
    assert len(rows) == 1 and "back to back" in stdout
    assert stdout.count("#   parts: experts alone ") == 1 and stdout.count("#   caches (cold, hot ms") == 1
    assert stdout.count("#   experts reading one expert's weights ") == 1
    assert "== ours" in (tmp_path / "64_fp32_k2_1.25.txt").read_text()


def test_moe_layer_bench_against_another_version():
    """--against imports another checkout's package under its own name and times its layer beside this one's; here
    the same package, so the two layers compute the same thing."""
    package = str(ROOT / "clipmoe")
    stdout = _bench("moe_layer.py", "--tokens", "64", "--dtypes", "fp32", "amp", "--ks", "1", "--cfs", "dropless",
                    "--reps", "1", "--inputs", "1", "--against", package)
    assert stdout.count(f"#   against {package}: ") == 2, stdout
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("    64")] == ["fp32", "amp"], stdout


def test_moe_layer_bench_rotates_the_order_of_the_implementations():
    """Each implementation follows each other one equally often, so none always runs in the state another left."""
    spec = importlib.util.spec_from_file_location("bench_moe_layer", ROOT / "scripts/bench/moe_layer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    steps = {name: (lambda x, name=name: calls.append(name)) for name in "abc"}
    times = bench.measure(steps, [None], reps=6, device=torch.device("cpu"))
    assert set(times) == set("abc")
    timed = calls[3:]  # after the warm-up
    assert timed[:9] == list("abcbcacab") and timed[9:] == timed[:9]


def test_train_step_bench_runs():
    stdout = _bench("train_step.py", "--arch", "clipmoe-micro", "--batch", "4", "--steps", "1", "--device", "cpu")
    assert "train step ms: eager" in stdout


def test_grad_checkpointing_bench_runs():
    stdout = _bench("grad_checkpointing.py", "--arch", "clipmoe-micro", "--batch", "2", "--reps", "1")
    assert "plain" in stdout and "checkpointed" in stdout


def test_expert_parallel_bench_runs():
    stdout = _bench("expert_parallel.py", "--tokens", "64", "--reps", "1", "--ks", "2", "--cfs", "1.25")
    rows = [line for line in stdout.splitlines() if line.split()[:2] == ["2", "1.25"]]
    assert len(rows) == 1, stdout


def test_encode_images_bench_runs(tmp_path):
    stdout = _bench("encode_images.py", "--images", "6", "--archs", "clipmoe-micro", "--batch-size", "4", "--reps", "1",
                    "--device", "cpu", "--root", str(tmp_path))
    row = [line.split() for line in stdout.splitlines() if line.startswith("clipmoe-micro")]
    assert len(row) == 1 and float(row[0][-1]) < 1e-5, stdout  # the same embeddings as the plain loop


def test_accumulation_bench_runs():
    stdout = _bench("accumulation.py", "--arch", "clipmoe-micro", "--batch", "8", "--accum", "2", "--reps", "1")
    assert "one batch" in stdout and "2 x 4" in stdout
