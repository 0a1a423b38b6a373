"""Small utilities: image grids and plots."""
