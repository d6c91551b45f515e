"""WebDataset pipelines and shard writing. A leaf package: it never imports clipmoe."""
from .pipeline import DataError, ImageTextLoader, expand_shards, image_text_loader
from .shards import shard_urls, write_shards

__all__ = ["DataError", "ImageTextLoader", "expand_shards", "image_text_loader", "shard_urls", "write_shards"]
