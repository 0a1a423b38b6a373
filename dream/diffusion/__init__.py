"""Gaussian diffusion for the per-token diffusion head (IDDPM / DiT / MAR formulation).

Re-implemented from the IDDPM paper (Nichol & Dhariwal, 2021, arXiv 2102.09672) and the behaviour
of the MAR code (arXiv 2406.11838, github.com/LTH14/mar, ``diffusion/``).
"""
from .gaussian import GaussianDiffusion, create_diffusion, cosine_betas, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "cosine_betas", "space_timesteps"]
