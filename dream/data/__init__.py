"""Data: webdataset pipelines, shard writer, transforms and the synthetic ShapesWorld dataset."""
from .latent_cache import build_latent_cache as build_latent_cache
from .shapes import ShapesConfig as ShapesConfig
from .shapes import ShapesWorld as ShapesWorld
from .shapes import write_shards as write_shapes_shards
from .shards import make_shards as make_shards
from .webdataset import ImageTextLoader as ImageTextLoader
from .webdataset import make_dataloader as make_dataloader
