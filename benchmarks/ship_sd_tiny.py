"""Copy a finished ``dream train-sd`` run into the package as ``sd_tiny.shapes`` and print its table entry.

    python benchmarks/ship_sd_tiny.py runs/sd_tiny_shapes --command "dream train-sd --config ... --out ..."

* ``RUN/pipeline/*`` (the diffusers folder the run exported and evaluated) -> ``dream/assets/sd_tiny_shapes/``;
* ``training.json`` (commands, config, seed, wall time, hardware, library versions, parameter counts, sampler,
  measured accuracy) and ``train_config.yaml`` (the recipe) next to it;
* ``metrics.jsonl``, ``loss.png`` and a sample grid -> ``docs/checkpoints/sd_tiny_shapes/`` (not in the wheel);
* prints the ``files={...}`` sha256 table for :mod:`dream.models.pretrained`.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--command", action="append", required=True, help="the command(s) that made the run, in order")
    ap.add_argument("--config", default="configs/sd_tiny_shapes.yaml")
    ap.add_argument("--hardware", default="2 vCPU x86_64 (no GPU, fp32), shared with other jobs (load 5-12)")
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    import diffusers
    import torch
    import transformers

    res = json.loads((args.run / "sd_training.json").read_text())
    cfg = json.loads((args.run / "sd_train_config.json").read_text())
    dest = ROOT / "dream" / "assets" / "sd_tiny_shapes"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(args.run / "pipeline", dest)
    shutil.copy(ROOT / args.config, dest / "train_config.yaml")
    sampler = {k: v for k, v in res["sampler"].items()}
    training = {
        "command": " && ".join(args.command), "commands": args.command, "config": args.config, "seed": cfg["seed"],
        "steps": res["steps"], "batch_size": cfg["batch_size"], "images_seen": res["images_seen"],
        "wall_s": res["cache_s"] + res["train_s_total"] + res["eval_s"], "cache_s": res["cache_s"],
        "train_s": res["train_s_total"], "eval_s": res["eval_s"],
        "hardware": args.hardware, "platform": platform.platform(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "params": res["params"], "weights": f"EMA (decay {cfg['ema_decay']}), UNet and text encoder stored in "
                                             f"{cfg['export_dtype']}, VAE in float32",
        "text_encoder": ("trained jointly with the UNet from its seeded random initialisation"
                         if cfg["train_text_encoder"] else "frozen at its seeded random initialisation"),
        "vae": "shapes_vae (dream train-vae --config configs/vae_shapes.yaml), latent shift folded into "
               "quant_conv / post_quant_conv",
        "sampler": sampler, "test": res["test"], "geneval_shapes": res.get("geneval_shapes"),
        "date": datetime.date.today().isoformat(), "notes": args.note,
    }
    (dest / "training.json").write_text(json.dumps(training, indent=2) + "\n")

    docs = ROOT / "docs" / "checkpoints" / "sd_tiny_shapes"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "loss.png"):
        shutil.copy(args.run / name, docs / name)
    _sample_grid(dest, sampler, docs / "samples.png")

    files = {str(p.relative_to(dest)): sha256(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    size = sum((dest / f).stat().st_size for f in files)
    print(f"# {len(files)} files, {size / 2**20:.1f} MiB")
    print("files={" + ",\n       ".join(f'"{k}": "{v}"' for k, v in files.items()) + "},")


def _sample_grid(folder: Path, sampler: dict, path: Path) -> None:
    """Sixteen held-out single-object prompts (test split), one image each, with the shipped sampler."""
    from dream.data.shapes import ShapesWorld
    from dream.models.diffusers_export import load_sd_pipeline, sd_generate
    from dream.utils.images import save_grid

    prompts = ShapesWorld().random_prompt_specs(16, "test", types=("single",))
    caps = [p.caption for p in prompts]
    pipe = load_sd_pipeline(folder)
    imgs = sd_generate(pipe, caps, seed=0, num_inference_steps=sampler["num_inference_steps"],
                       guidance_scale=sampler["guidance_scale"])
    save_grid(imgs, caps, path, ncol=8)


if __name__ == "__main__":
    main()
