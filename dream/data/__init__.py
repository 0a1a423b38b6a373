"""Data: webdataset pipelines, shard writer, transforms and the synthetic ShapesWorld dataset."""
