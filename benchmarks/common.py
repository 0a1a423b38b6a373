"""Shared benchmark helpers: same-run GEMM peaks, timing, JSON results and the "reference config" model.

The reference configuration is the one of the official CPU baseline
(the official DREAM code timed on CPU, its config (a)): 32x32 pixel-space images as 64 tokens of 48
dims (vae_stride 1, patch 4, 3 channels), width 256 with 4 encoder + 4 decoder blocks of 4 heads, a
16-token buffer, a 2-block text aligner over (B, 16, 384) text features, a CLIP text tower of width
128 / 2 layers / 2 heads / context 32, and a 256 x 3 diffusion MLP sampled with 100 steps. Weights are the
official initialisation then every float tensor += 0.02 N(0, 1) (this makes the zero-initialised adaLN
and final layers non-zero; values do not affect speed).

Machine speed varies between instances by ~3x, so every benchmark reports a GEMM peak measured in
the same run (2048^3 matmul, median of several) and a machine-independent cost
``seconds x peak TFLOP/s``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CLIP_SOT, CLIP_EOT = 49406, 49407


# -----------------------------------------------------------------------------------------------
# Machine
# -----------------------------------------------------------------------------------------------
def gemm_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7,
              device: str = "cpu") -> float:
    """Median TFLOP/s of an ``n^3`` matmul in ``dtype`` (2 n^3 FLOPs per call; one untimed warm-up)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    times = time_calls(lambda: torch.mm(a, b), repeats=repeats, warmup=1, device=device)
    return 2.0 * n ** 3 / statistics.median(times) / 1e12


def measure_peaks(repeats: int = 7, n: int = 2048, device: str = "cpu") -> dict:
    """Same-run fp32 and bf16 GEMM peaks in TFLOP/s (medians of ``repeats`` timed calls)."""
    return {"fp32_tflops": gemm_peak(torch.float32, n, repeats, device),
            "bf16_tflops": gemm_peak(torch.bfloat16, n, repeats, device), "n": n, "repeats": repeats}


def machine_info() -> dict:
    """What the numbers depend on: CPU, threads, library versions, load at the time of the run."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    try:
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


# -----------------------------------------------------------------------------------------------
# Timing and results
# -----------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize(times: Sequence[float]) -> dict:
    """Median, min and max of a list of seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times),
            "all_s": list(times)}


def write_results(name: str, payload: dict, path: Optional[os.PathLike] = None) -> Path:
    """Write ``payload`` (plus ``machine``) as JSON to ``benchmarks/results/<name>.json`` (or ``path``)."""
    out = Path(path) if path is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine_info(), **payload}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, out)
    return out


# -----------------------------------------------------------------------------------------------
# The reference model
# -----------------------------------------------------------------------------------------------
def reference_config(**overrides):
    """:class:`~dream.DreamConfig` of the official CPU baseline's config (a) (see the module docstring)."""
    from dream import DreamConfig

    cfg = DreamConfig(img_size=32, vae_stride=1, patch_size=4, vae_embed_dim=3, buffer_size=16,
                      encoder_embed_dim=256, encoder_depth=4, encoder_num_heads=4,
                      decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=4, mlp_ratio=4.0,
                      text_embed_dim=384, text_max_len=16, text_aligner_depth=2,
                      clip_context_length=32, clip_vocab_size=49408, clip_width=128, clip_heads=2, clip_layers=2,
                      embed_dim=256, proj_hidden_dim=1024, diffloss_depth=3, diffloss_width=256,
                      diffusion_batch_mul=4, num_sampling_steps="100")
    return cfg.replace(**overrides) if overrides else cfg


def perturb_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add ``std * N(0, 1)`` to every floating-point parameter and buffer, in place (as the baseline)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(std * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype))
    return model


def build_model(config=None, *, seed: int = 0, perturb: float = 0.02, device: str = "cpu"):
    """An eval-mode DREAM model: official init with ``torch.manual_seed(seed)``, then ``perturb_``."""
    import dream

    torch.manual_seed(seed)
    model = dream.create_model(config if config is not None else reference_config())
    if perturb:
        perturb_(model, perturb, seed)
    return model.to(device).eval()


def reference_model(seed: int = 0, device: str = "cpu", **overrides):
    """The reference-config model (see :func:`reference_config`), perturbed like the baseline."""
    return build_model(reference_config(**overrides), seed=seed, device=device)


def reference_inputs(config, batch: int = 16, seed: int = 0, device: str = "cpu") -> dict:
    """Synthetic prompts like the baseline's: random N(0, 1) text features (B, Lt, Dt), one random null
    prompt (1, Lt, Dt) for CFG, and CLIP BPE-layout ids (B, ctx): SOT, random ids, EOT (the max id,
    pooled) at a random length of 6..ctx, then zero padding."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Lt, Dt, ctx, vocab = config.text_max_len, config.text_embed_dim, config.clip_context_length, config.clip_vocab_size
    feats = torch.randn(batch, Lt, Dt, generator=g)
    null = torch.randn(1, Lt, Dt, generator=g)
    sot, eot = min(CLIP_SOT, vocab - 2), vocab - 1
    ids = torch.zeros(batch, ctx, dtype=torch.long)
    lengths = torch.randint(min(6, ctx), ctx + 1, (batch,), generator=g)
    body = torch.randint(1, sot, (batch, ctx), generator=g)
    pos = torch.arange(ctx)[None]
    ids = torch.where(pos < lengths[:, None] - 1, body, ids)
    ids[:, 0] = sot
    ids[torch.arange(batch), lengths - 1] = eot
    return {"text_feats": feats.to(device), "null_feats": null.to(device), "clip_ids": ids.to(device)}


def fmt_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """Plain-text table with right-aligned numeric columns."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
