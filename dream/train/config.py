"""``TrainConfig``: everything a training run needs, frozen and YAML/JSON round-trippable."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dream.utils.config import ConfigBase, ConfigError, check_seed


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    # --- model ---
    model: str = "dream_tiny"                 # registry name
    model_overrides: dict = field(default_factory=dict)
    init_from: Optional[str] = None           # fine-tune from a checkpoint (ours or official; EMA preferred)
    frozen: tuple = ()                        # parameter-name prefixes to freeze, e.g. ("transformer.",)
    lora: Optional[dict] = None               # LoRA fine-tuning, e.g. {"rank": 16, "alpha": 16, "targets": "decoder_attn"}
    # --- data ---
    data: str = "shapes"                      # "shapes" (ShapesWorld stream) or shard urls ('shards/{000..009}.tar')
    shapes: dict = field(default_factory=dict)  # ShapesConfig overrides for data="shapes"
    tokenizer: str = "pixel"                  # "pixel" or a VAE folder / checkpoint path
    text_encoder: str = "minilm"              # minilm | hf:PATH | random
    use_text_padding_mask: bool = False       # official DREAM: no padding mask
    num_workers: int = 0
    shuffle_buffer: int = 1000
    data_options: dict = field(default_factory=dict)  # shards: WebDatasetConfig fields, e.g. max_member_bytes
    # --- schedule ---
    batch_size: int = 64                      # per process
    grad_accum: int = 1
    steps: int = 1000                         # optimizer steps
    minutes: Optional[float] = None           # wall-clock budget (stops early, checkpoint written)
    steps_per_epoch: Optional[int] = None     # progress unit of the Masking Warmup; default steps / 48
    masking: dict = field(default_factory=lambda: {"preset": "dream"})
    # --- optimiser ---
    blr: float = 1e-4                         # lr = blr * global batch / 256 unless lr is given
    lr: Optional[float] = None
    min_lr: float = 0.0
    lr_schedule: str = "constant"             # constant (official) | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.04
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    official_weight_decay: bool = True
    # --- runtime ---
    precision: str = "auto"                   # auto (bf16 where supported) | bf16 | fp16 | fp32
    compile: bool = False
    device: Optional[str] = None
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 3
    sample_every: int = 0                     # 0 = only at the end
    sample_prompts: tuple = ()
    sample_num_iter: int = 16
    sample_cfg: float = 3.0
    sample_clip_denoised: Optional[float] = None  # clamp the head's x0 when sampling VAE tokens (pixels: 1.0)

    def __post_init__(self):
        super().__post_init__()
        try:
            check_seed(self.seed, "TrainConfig.seed", bits=63)     # 63 bits: seed + rank still fits
        except ValueError as e:
            raise ConfigError(str(e)) from None


def run_config(cls, command: str, args, saved_name: str):
    """``(out, config)`` of a CLI run (``args`` with ``out``, ``resume``, ``config``). The config is the one saved
    in the ``resume`` folder, else the ``config`` file, else defaults. Sets up logging; a missing output folder or
    file ends the command with a message naming it."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = args.out or args.resume
    if not out:
        raise SystemExit(f"{command}: give --out RUN (or --resume RUN)")
    if args.resume:
        saved = Path(args.resume) / saved_name
        if not saved.exists():
            raise SystemExit(f"{command} --resume: {saved} not found")
        return out, cls.load(saved)
    if args.config:
        if not Path(args.config).exists():
            raise SystemExit(f"{command}: config file not found: {args.config}")
        return out, cls.load(args.config)
    return out, cls()


def refuse_command_urls(data: str, source: Path, command: str = "dream train") -> None:
    """End the command if ``data`` (read from the run-folder file ``source``) holds shard URLs that start a
    program when opened (``pipe:CMD`` runs CMD in a shell; ``https://`` etc. run curl / gsutil): a run folder can
    come from someone else, and its checkpoints are loaded without running code, so its config must not either."""
    from dream.data.decoding import command_urls

    bad = command_urls(data)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise SystemExit(f"{command} --resume: {source} sets data to URLs that run a program when opened: "
                         f"{bad[:3]}{more}. They are not opened from a run folder's config: pass the data again "
                         f"with --data, or add --allow-command-urls if you trust this folder")
