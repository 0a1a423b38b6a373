"""Generation: MAR sampler, Semantically Aligned Decoding, best-of-K reranking."""
from .diffusion_sampler import TokenDiffusionSampler as TokenDiffusionSampler
from .mar import DecodeState as DecodeState
from .mar import MARSampler as MARSampler
from .mar import SamplerConfig as SamplerConfig
from .sad import SADOutput as SADOutput
from .sad import SemanticallyAlignedDecoding as SemanticallyAlignedDecoding
from .sad import best_of_k as best_of_k
from .sad import critic_scores as critic_scores
from .sad import resolve_threshold as resolve_threshold
from .schedules import cfg_at as cfg_at
from .schedules import mask_len_after as mask_len_after
from .schedules import reveal_counts as reveal_counts
from .diffusion_sampler import intra_op_threads as intra_op_threads
from .mar import decode_rows as decode_rows
from .mar import FAST_PRESET as FAST_PRESET
from .mar import fast_config as fast_config
from .mar import FAST_AR_SCALE as FAST_AR_SCALE
