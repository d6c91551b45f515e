import math

import pytest
import torch

import loaders
from loaders import synthetic


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """4 train shards of procedural scenes (16 px) and 1 eval shard, written once per session."""
    root = tmp_path_factory.mktemp("shards")
    loaders.write_shards(synthetic.scenes(256, 0, "train", image_size=16), root / "train", samples_per_shard=64)
    loaders.write_shards(synthetic.scenes(64, 0, "eval", image_size=16), root / "eval", samples_per_shard=64)
    return {"train": loaders.shard_urls(root / "train"), "eval": loaders.shard_urls(root / "eval"), "root": root}


class _PoisonedGroupedMM(torch.autograd.Function):
    """F.grouped_mm's 2D x 3D semantics (row groups of a ending at offs, one matrix of b each) on the CPU, with
    what the real kernel leaves undefined, the output and input gradient of rows after offs[-1], set to NaN."""

    @staticmethod
    def forward(ctx, a_SK, b_EKN, offs):
        ends = offs.tolist()
        ctx.groups = list(zip([0] + ends[:-1], ends))
        ctx.save_for_backward(a_SK, b_EKN)
        out = a_SK.new_full((a_SK.shape[0], b_EKN.shape[2]), float("nan"))
        for i, (s, e) in enumerate(ctx.groups):
            out[s:e] = a_SK[s:e] @ b_EKN[i]
        return out

    @staticmethod
    def backward(ctx, g_SN):
        a_SK, b_EKN = ctx.saved_tensors
        g_a, g_b = torch.full_like(a_SK, float("nan")), torch.zeros_like(b_EKN)
        for i, (s, e) in enumerate(ctx.groups):
            g_a[s:e] = g_SN[s:e] @ b_EKN[i].t()
            g_b[i] = a_SK[s:e].t() @ g_SN[s:e]
        return g_a, g_b, None


@pytest.fixture
def static_padding(monkeypatch):
    """Runs the GPU's static-capacity padded experts (fp32 capacity mode, no host sync) on the CPU; returns the
    list of (padded rows, rows) the path was asked about."""
    import clipmoe.experts as experts

    asked = []
    monkeypatch.setattr(experts, "_static_padding",
                        lambda x, padded, rows: asked.append((padded, rows)) or padded <= 2 * rows)
    monkeypatch.setattr(experts, "_capturing", lambda x: True)  # the path a CUDA graph captures
    return asked


@pytest.fixture
def emulated_grouped_mm(monkeypatch):
    """Runs the experts' CUDA grouped_mm path on the CPU (in any dtype) with an emulated grouped_mm; returns the
    list of compute dtypes the path was asked for."""
    import clipmoe.experts as experts

    asked = []
    def poisoned(a, b, offs):
        return _PoisonedGroupedMM.apply(a, b, offs)

    monkeypatch.setattr(experts, "_grouped_mm", lambda x, dtype: asked.append(dtype) or poisoned)
    return asked


@pytest.fixture(scope="session")
def ddp_baseline(tiny_shards, tmp_path_factory):
    """`test_distributed.baseline_config` trained under plain DDP on 2 gloo ranks, once per session: (config,
    what each rank ended with, output folder)."""
    from test_distributed import baseline_config, run_training

    tmp = tmp_path_factory.mktemp("ddp_baseline")
    cfg = baseline_config(tiny_shards, tmp)
    ranks = run_training(cfg, tmp / "ranks")
    assert ranks[0]["state"]["logit_scale"].item() == pytest.approx(math.log(100))  # the clamp held it
    assert [r["warnings"] for r in ranks] == [[], []]  # e.g. a deprecated collective would warn at every step
    return cfg, ranks, tmp / "run"
