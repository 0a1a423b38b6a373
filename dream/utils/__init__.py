"""Small utilities: image grids, plots, and run logging to TensorBoard / W&B."""
