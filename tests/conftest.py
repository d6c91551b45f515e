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
