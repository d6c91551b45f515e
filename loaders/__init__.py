"""WebDataset pipelines and shard writing. A leaf package: it never imports clipmoe."""
from .pipeline import DataError, ImageTextLoader, check_sources, expand_shards, image_text_loader
from .shards import shard_urls, write_shards
from .transforms import TrainTransform, normalize_batch
from .workers import leave_signals_to_the_parent, started

__all__ = ["DataError", "ImageTextLoader", "check_sources", "expand_shards", "image_text_loader", "shard_urls",
           "write_shards", "TrainTransform", "normalize_batch", "leave_signals_to_the_parent", "started"]
