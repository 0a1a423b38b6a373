"""Autotuning configurations and sequence-length bucketing for the flash-attention kernels.

Autotuning on raw sequence lengths re-tunes for every new length, which is a storm for DREAM's encoder
(64 buffer tokens + a variable number of visible tokens per masking ratio). The kernels therefore take
the raw lengths as ``do_not_specialize`` runtime integers and are autotuned on *bucketed* lengths
(``bucket_length``): one tuning per power of two.

Under the Triton CPU interpreter (``TRITON_INTERPRET=1``) benchmarking configurations is slow and
meaningless, so each kernel gets one small fixed configuration. Its blocks are deliberately unequal
(``BLOCK_M != BLOCK_N``) and small, so tiny test shapes still cross several blocks and exercise the
causal loop bounds and the ragged tails.

Only ``torch``-free code lives here; it is imported by ``kernels/attention.py`` after Triton imported.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, when the kernels are defined

_MIN_BUCKET = 64


def bucket_length(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, at least 64."""
    return max(_MIN_BUCKET, triton.next_power_of_2(max(int(n), 1)))


def _configs(table, interp_cfg):
    """``triton.Config`` list from (BLOCK_M, BLOCK_N, num_warps, num_stages) rows."""
    if INTERPRET:
        bm, bn = interp_cfg
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


# Forward: BLOCK_M queries per program, loop over BLOCK_N keys.
FWD_CONFIGS = _configs(
    [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 4),
    ],
    interp_cfg=(32, 16),
)

# Backward dK/dV: BLOCK_N keys per program, loop over BLOCK_M queries.
BWD_KV_CONFIGS = _configs(
    [
        (32, 128, 8, 3),
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 8, 3),
        (16, 64, 4, 2),
        (64, 64, 8, 2),
    ],
    interp_cfg=(16, 32),
)

# Backward dQ: BLOCK_M queries per program, loop over BLOCK_N keys.
BWD_Q_CONFIGS = _configs(
    [
        (128, 32, 8, 3),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (64, 16, 4, 2),
        (64, 64, 8, 2),
    ],
    interp_cfg=(32, 16),
)

# The preprocess kernel (delta = rowsum(dO * O)) is bandwidth-bound; a fixed block is fine.
PREPROCESS_BLOCK_M = 32 if INTERPRET else 128

# Autotune keys: bucketed lengths + everything that changes the compiled kernel (the autotuner adds the
# tensor dtypes itself).
TUNE_KEY = ["N_Q_BUCKET", "N_K_BUCKET", "HEAD_DIM", "HAS_MASK", "CAUSAL"]


def _make_prune(fp32_block_m: int, fp32_block_n: int):
    """``early_config_prune`` hook: drop tile shapes that cannot pay off before they are compiled and timed.

    fp32 inputs (``IEEE``) use full-precision FMA dots on 4-byte tiles: large tiles need 115-215 KB of shared
    memory on sm_90 (over the A100's 163 KB) and take 20-60 s each to compile, and fp32 is a correctness
    path (``dream.ops.attention`` only auto-selects the kernel for fp16/bf16), so it gets one small fixed
    tile without benchmarking. Head dim > 64 drops the 128 x 128 tile.
    """

    def prune(configs, named_args, **kwargs):
        if kwargs.get("IEEE", False):
            return [triton.Config({"BLOCK_M": fp32_block_m, "BLOCK_N": fp32_block_n}, num_warps=4, num_stages=2)]
        if kwargs.get("BLOCK_D", 64) > 64:
            kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
            return kept or configs
        return configs

    return prune


PRUNE_FWD = {"early_config_prune": _make_prune(64, 32)}
PRUNE_BWD_KV = {"early_config_prune": _make_prune(32, 64)}
PRUNE_BWD_Q = {"early_config_prune": _make_prune(64, 32)}
