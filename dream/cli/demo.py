"""``dream demo`` (run by ``make demo``): the whole library on ShapesWorld, on a CPU, in minutes.

(a) Loads the shipped ``dream_tiny.shapes`` checkpoint and an untrained model of the same size (the floor),
    samples held-out prompts with plain decoding and with Semantically Aligned Decoding, and measures
    image->text / text->image retrieval, a linear probe on object colour from frozen encoder features,
    FID against real ShapesWorld images (ShapesWorld CNN features), and compositional accuracy per
    question type with the exact ShapesWorld verifier.
(b) Trains a fresh ``dream_tiny`` from scratch for ``--minutes`` with the same trainer as ``dream train`` (MAR
    masking by default, so a few minutes already teach the generator colours; ``--fresh-masking dream`` for
    Masking Warmup) and reports its loss curve and the same metrics.

Writes ``report.json``, ``samples.png`` (plain vs SAD side by side, captioned) and ``loss.png``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget of the from-scratch run (b)")
    p.add_argument("--num-prompts", type=int, default=96,
                   help="held-out prompts (half single-object, half mixed) for compositional accuracy")
    p.add_argument("--num-single", type=int, default=128,
                   help="held-out single-object prompts for colour / shape accuracy (includes the single-object "
                        "half of --num-prompts)")
    p.add_argument("--num-real", type=int, default=256, help="real held-out images for retrieval / FID / probe")
    p.add_argument("--num-iter", type=int, default=None, help="AR steps of the sampler (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the checkpoint's)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--sad", default="4,0.25", help="SAD candidates and threshold (K,TAU)")
    p.add_argument("--fresh-masking", default="fluid", choices=("fluid", "dream"),
                   help="mask-ratio schedule of the from-scratch run: fluid (MAR masking, every step trains the "
                        "generator: it draws the prompted colour within minutes) or dream (Masking Warmup sized "
                        "to the budget: learns retrieval first, generates only after far longer runs)")
    p.add_argument("--fresh-batch-size", type=int, default=32,
                   help="batch size of the from-scratch run (small batches: more updates per minute)")
    p.add_argument("--skip-train", action="store_true", help="skip part (b)")
    p.add_argument("--text-encoder", default=None, help="override the text encoder (minilm | random)")
    p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------------------
def _acc(g: dict, key: str) -> str:
    """'0.875 ±0.029' (binomial standard error over the single-object prompts)."""
    v, se = g[f"single_object_{key}_acc"], g.get(f"single_object_{key}_acc_se")
    return f"{v:.3f}" if se is None else f"{v:.3f} ±{se:.3f}"


def _print_table(report: dict) -> None:
    rows = [("model", "R@1 i2t", "R@1 t2i", "probe colour", "colour acc", "shape acc", "prompt acc",
             "SAD prompt acc", "FID (CNN)")]
    for name, r in report["models"].items():
        u, g = r["understanding"], r["generation"]
        rows.append((name, f"{u['retrieval'].get('i2t_R@1', float('nan')):.3f}",
                     f"{u['retrieval'].get('t2i_R@1', float('nan')):.3f}", f"{u['linear_probe_colour_acc']:.3f}",
                     _acc(g["plain"], "colour"), _acc(g["plain"], "shape"),
                     f"{g['plain']['prompt_accuracy']:.3f}", f"{g['sad']['prompt_accuracy']:.3f}",
                     f"{g['plain']['fid_shapes_cnn']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for name, r in report["models"].items():
        acc = r["generation"]["plain"]["accuracy_per_question_type"]
        sad = r["generation"]["sad"]["accuracy_per_question_type"]
        print(f"{name}: per question type (plain / SAD): " +
              ", ".join(f"{k} {acc[k]:.2f}/{sad.get(k, float('nan')):.2f}" for k in acc))


def run(args) -> int:
    import dream
    from dream.pipeline import SAMPLING_DEFAULTS, DreamPipeline
    from dream.cli.sample import parse_sad
    from dream.utils.images import save_grid

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(args.seed)
    print("[demo] preparing held-out ShapesWorld data, verifier and CNN features ...", flush=True)
    from dream.eval.shapes_bench import ShapesBench

    bench = ShapesBench(args.num_prompts, args.num_real, num_single=args.num_single)
    sad = parse_sad(args.sad)
    report: dict = {"settings": vars(args).copy(), "models": {}}
    report["settings"].pop("_module", None)
    report["settings"].pop("func", None)

    shipped = DreamPipeline.from_pretrained("dream_tiny.shapes", text_encoder=args.text_encoder)
    # every model in the demo samples with the shipped checkpoint's settings (pipeline.json) unless overridden
    d = {**SAMPLING_DEFAULTS, **shipped.sampling_defaults}
    temperature = args.temperature if args.temperature is not None else d["temperature"]
    cfg = args.cfg if args.cfg is not None else d["cfg"]
    num_iter = args.num_iter if args.num_iter is not None else d["num_iter"]
    cfg_schedule = d["cfg_schedule"]
    report["settings"].update(temperature=temperature, cfg=cfg, num_iter=num_iter, cfg_schedule=cfg_schedule,
                              clip_denoised=shipped.clip_denoised)
    torch.manual_seed(args.seed)
    untrained = DreamPipeline(dream.create_model(shipped.model.config), shipped.tokenizer,  # same arch, random init
                              shipped.text_encoder_spec, shipped.use_padding_mask, clip_denoised=shipped.clip_denoised)
    grids = {}
    for name, pipe in (("shipped dream_tiny.shapes", shipped), ("untrained (floor)", untrained)):
        print(f"[demo] evaluating {name} ...", flush=True)
        r, gen = bench.evaluate(pipe, num_iter, cfg, temperature, sad, args.seed, cfg_schedule)
        report["models"][name] = r
        grids[name] = gen

    if not args.skip_train:
        from dream.models.pretrained import pretrained_path
        from dream.train import TrainConfig
        from dream.train.loop import Trainer

        print(f"[demo] training a fresh dream_tiny for {args.minutes:g} min ({args.fresh_masking} masking, "
              f"batch {args.fresh_batch_size}) ...", flush=True)
        tcfg = TrainConfig.load(pretrained_path("dream_tiny.shapes") / "train_config.yaml")   # the shipped recipe
        # The shipped recipe (Masking Warmup over 36 of 48 epochs, lr 4e-4 cosine, batch 64) is tuned for an hour
        # and draws its first correct colours after ~3,000 steps; a few minutes on 2 cores is ~500 steps. So the
        # short run uses constant lr 1e-3, batch 32 and, by default, MAR masking (`fluid`), with which every step
        # trains the generator (measured at 800 x 32 images: colour accuracy 0.44 with fluid vs 0.28 with a
        # budget-sized Masking Warmup; untrained floor 0.10). Masking Warmup progress is counted in steps, so for
        # `--fresh-masking dream` the schedule is sized to what the budget can run (~2.2 steps/s at batch 64 on
        # 2 CPU cores, 2.8 at batch 32; measured) and completes within it.
        rate = 2.2 * (64 / args.fresh_batch_size) ** (1 / 3)
        est_steps = max(20, int(args.minutes * 60 * rate))
        masking = {"preset": args.fresh_masking}
        tcfg = tcfg.replace(minutes=args.minutes, steps=est_steps, steps_per_epoch=max(1, est_steps // 48),
                            batch_size=args.fresh_batch_size, masking=masking,
                            ckpt_every=0, sample_every=0, log_every=10, lr=1e-3,
                            sample_prompts=(), lr_schedule="constant", warmup_steps=50,
                            **({"text_encoder": args.text_encoder} if args.text_encoder else {}))
        if args.fresh_masking == "fluid":      # nothing is sized to the step count: the budget ends the run
            tcfg = tcfg.replace(steps=int(est_steps * 1.5))
        trainer = Trainer(tcfg, out / "fresh")
        res = trainer.fit()
        fresh = DreamPipeline(trainer.model, shipped.tokenizer, tcfg.text_encoder, tcfg.use_text_padding_mask,
                              clip_denoised=shipped.clip_denoised)
        r, gen = bench.evaluate(fresh, num_iter, cfg, temperature, sad, args.seed, cfg_schedule)
        r["training"] = {"steps": res["steps"], "wall_s": res["wall_s"], "masking": args.fresh_masking,
                         "batch_size": tcfg.batch_size, "images_seen": res["steps"] * tcfg.batch_size,
                         "final_loss": trainer.history[-1]["loss"] if trainer.history else math.nan}
        report["models"][f"fresh ({args.minutes:g} min)"] = r
        from dream.utils.plots import plot_loss_curves

        plot_loss_curves(trainer.history, out / "loss.png", title=f"dream_tiny from scratch, {args.minutes:g} min")

    # samples.png: for each prompt, plain | SAD of the shipped model
    g = grids["shipped dream_tiny.shapes"]
    n = min(16, len(g["captions"]))
    first_mixed = len(bench.prompts) - len(bench.mixed)
    idx = list(range(0, n // 2)) + list(range(first_mixed, first_mixed + n - n // 2))
    pairs = torch.stack([torch.stack([g["images"]["plain"][i], g["images"]["sad"][i]]) for i in idx]).flatten(0, 1)
    caps = [c for i in idx for c in (g["captions"][i] + " [plain]", "[SAD]")]
    save_grid(pairs, caps, out / "samples.png", ncol=8)
    report["wall_s"] = time.time() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print()
    _print_table(report)
    print(f"\n[demo] wrote {out / 'report.json'}, {out / 'samples.png'}, {out / 'loss.png'} "
          f"in {report['wall_s'] / 60:.1f} min")
    return 0
