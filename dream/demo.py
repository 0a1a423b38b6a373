"""``dream demo`` (run by ``make demo``): the whole library on ShapesWorld, on a CPU, in minutes.

(a) Loads the shipped ``dream_tiny.shapes`` checkpoint and an untrained model of the same size (the floor),
    samples held-out prompts with plain decoding and with Semantically Aligned Decoding, and measures
    image->text / text->image retrieval, a linear probe on object colour from frozen encoder features,
    FID against real ShapesWorld images (ShapesWorld CNN features), and compositional accuracy per
    question type with the exact ShapesWorld verifier.
(b) Trains a fresh ``dream_tiny`` from scratch for ``--minutes`` with the same trainer as ``dream train`` and
    reports its loss curve and the same metrics.

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
    p.add_argument("--num-prompts", type=int, default=32, help="held-out prompts per generation evaluation")
    p.add_argument("--num-real", type=int, default=256, help="real held-out images for retrieval / FID / probe")
    p.add_argument("--num-iter", type=int, default=None, help="AR steps of the sampler (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the checkpoint's)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--sad", default="4,0.25", help="SAD candidates and threshold (K,TAU)")
    p.add_argument("--skip-train", action="store_true", help="skip part (b)")
    p.add_argument("--text-encoder", default=None, help="override the text encoder (minilm | random)")
    p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------------------
# Evaluation of one pipeline
# ---------------------------------------------------------------------------------------------------------
class ShapesBench:
    """Held-out ShapesWorld data and the evaluators shared by every model in the demo."""

    def __init__(self, num_prompts: int, num_real: int, image_size: int = 32):
        from dream.data.shapes import ShapesConfig, ShapesWorld
        from dream.eval.compositional import Verifier
        from dream.eval.shapes_features import load_shapes_feature_extractor

        self.world = ShapesWorld(ShapesConfig(image_size=image_size))
        self.verifier = Verifier(self.world.config)
        self.features = load_shapes_feature_extractor()
        self.real, self.real_caps, self.real_meta = self.world.batch(range(num_real), "test")
        half = num_prompts // 2
        self.single = self.world.random_prompt_specs(half, "test", types=("single",))
        self.mixed = self.world.random_prompt_specs(num_prompts - half, "val")
        self.prompts = self.single + self.mixed
        # probe data: single-object images labelled by colour
        probe_imgs, probe_labels, i = [], [], 0
        colours = list(self.world.config.colours)
        while len(probe_labels) < 420 and i < 20000:
            metas = [self.world.sample_meta(j, "val") for j in range(i, i + 200)]
            for m in metas:
                if len(m["objects"]) == 1:
                    probe_imgs.append(m)
                    probe_labels.append(colours.index(m["objects"][0]["colour"]))
            i += 200
        self.probe_images = self.world.render_batch(probe_imgs[:420])
        self.probe_labels = torch.tensor(probe_labels[:420])
        with torch.no_grad():
            self.real_feats = self.features(self.real)

    def fid(self, images: torch.Tensor) -> float:
        from dream.eval.fid import frechet_distance

        with torch.no_grad():
            fake = self.features(images.clamp(-1, 1))
        def stats(f):
            f = f.double()
            return f.mean(0), torch.cov(f.T)
        return float(frechet_distance(*stats(self.real_feats), *stats(fake)))

    def understanding(self, pipe) -> dict:
        from dream.eval.linear_probe import fit_logistic_regression
        from dream.eval.retrieval import retrieval_recall

        img = pipe.encode_images(self.real)
        txt = pipe.encode_text(self.real_caps)
        ret = retrieval_recall(img, txt, ks=(1, 5, 10))
        x = self.probe_images.float() / 127.5 - 1 if self.probe_images.dtype == torch.uint8 else self.probe_images
        with torch.no_grad():
            tokens = pipe.tokenizer.encode(x.to(pipe.device), sample=False)
            h = pipe.model.forward_encoder(tokens, apply_norm=False)
            feats = pipe.model.pool(h, how="buffer").float().cpu()   # official probe features
        n_train = 300
        clf = fit_logistic_regression(feats[:n_train], self.probe_labels[:n_train],
                                      num_classes=len(self.world.config.colours))
        acc = float((clf.predict(feats[n_train:]) == self.probe_labels[n_train:]).float().mean())
        return {"retrieval": ret, "linear_probe_colour_acc": acc,
                "linear_probe_chance": 1.0 / len(self.world.config.colours)}

    def generation(self, pipe, num_iter: int, cfg: float, temperature: float, sad, seed: int,
                   cfg_schedule: str | None = None) -> dict:
        caps = [p.caption for p in self.prompts]
        specs = [p.spec for p in self.prompts]
        n1 = len(self.single)
        out, images = {}, {}
        for name, kw in (("plain", {}), ("sad", {"sad": sad})):
            t0 = time.time()
            imgs = pipe.generate(caps, num_iter=num_iter, cfg=cfg, temperature=temperature, seed=seed,
                                 cfg_schedule=cfg_schedule,
                                 batch_size=len(caps), progress=True, **kw)
            dt = time.time() - t0
            sc = self.verifier.score(imgs, specs, details=False)
            out[name] = {"seconds_per_image": dt / len(caps),
                         "single_object_colour_acc": self.verifier.colour_accuracy(imgs[:n1], specs[:n1]),
                         "single_object_shape_acc": self.verifier.shape_accuracy(imgs[:n1], specs[:n1]),
                         "accuracy_per_question_type": sc["accuracy"],
                         "prompt_accuracy": sc["prompt_accuracy"], "question_accuracy": sc["question_accuracy"],
                         "fid_shapes_cnn": self.fid(imgs)}
            images[name] = imgs
        return {"metrics": out, "images": images, "captions": caps}

    def evaluate(self, pipe, num_iter, cfg, temperature, sad, seed, cfg_schedule=None) -> tuple[dict, dict]:
        und = self.understanding(pipe)
        gen = self.generation(pipe, num_iter, cfg, temperature, sad, seed, cfg_schedule)
        return {"understanding": und, "generation": gen["metrics"]}, gen


# ---------------------------------------------------------------------------------------------------------
def _print_table(report: dict) -> None:
    rows = [("model", "R@1 i2t", "R@1 t2i", "probe colour", "colour acc", "shape acc", "prompt acc",
             "SAD prompt acc", "FID (CNN)")]
    for name, r in report["models"].items():
        u, g = r["understanding"], r["generation"]
        rows.append((name, f"{u['retrieval'].get('i2t_R@1', float('nan')):.3f}",
                     f"{u['retrieval'].get('t2i_R@1', float('nan')):.3f}", f"{u['linear_probe_colour_acc']:.3f}",
                     f"{g['plain']['single_object_colour_acc']:.3f}", f"{g['plain']['single_object_shape_acc']:.3f}",
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
    from dream.sampling.cli import parse_sad
    from dream.utils.images import save_grid

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(args.seed)
    print("[demo] preparing held-out ShapesWorld data, verifier and CNN features ...", flush=True)
    bench = ShapesBench(args.num_prompts, args.num_real)
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
        from dream.train import TrainConfig
        from dream.train.loop import Trainer

        print(f"[demo] training a fresh dream_tiny for {args.minutes:g} min ...", flush=True)
        tcfg = TrainConfig.load(Path(__file__).resolve().parent / "assets" / "dream_tiny_shapes" / "train_config.yaml")
        # Masking Warmup progress is measured in steps: size the schedule to what the budget can run
        # (~2.2 steps/s for dream_tiny on the 16 VAE tokens at batch 64 on 2 CPU cores), so the warmup completes
        # within the budget. Constant lr 1e-3 (the shipped run's 4e-4 cosine is tuned for an hour, not minutes).
        est_steps = max(20, int(args.minutes * 60 * 2.2))
        tcfg = tcfg.replace(minutes=args.minutes, steps=est_steps, steps_per_epoch=max(1, est_steps // 48),
                            ckpt_every=0, sample_every=0, log_every=10, lr=1e-3,
                            sample_prompts=(), lr_schedule="constant", warmup_steps=50,
                            **({"text_encoder": args.text_encoder} if args.text_encoder else {}))
        trainer = Trainer(tcfg, out / "fresh")
        res = trainer.fit()
        fresh = DreamPipeline(trainer.model, shipped.tokenizer, tcfg.text_encoder, tcfg.use_text_padding_mask,
                              clip_denoised=shipped.clip_denoised)
        r, gen = bench.evaluate(fresh, num_iter, cfg, temperature, sad, args.seed, cfg_schedule)
        r["training"] = {"steps": res["steps"], "wall_s": res["wall_s"],
                         "images_seen": res["steps"] * tcfg.batch_size,
                         "final_loss": trainer.history[-1]["loss"] if trainer.history else math.nan}
        report["models"][f"fresh ({args.minutes:g} min)"] = r
        from dream.utils.plots import plot_loss_curves

        plot_loss_curves(trainer.history, out / "loss.png", title=f"dream_tiny from scratch, {args.minutes:g} min")
    else:
        ship_hist = Path(dream.models.registry.ASSETS) / "dream_tiny_shapes" / "metrics.jsonl"
        if ship_hist.exists():
            from dream.utils.plots import plot_loss_curves

            hist = [json.loads(x) for x in ship_hist.read_text().splitlines() if x.strip()]
            plot_loss_curves(hist, out / "loss.png", title="dream_tiny.shapes training")

    # samples.png: for each prompt, plain | SAD of the shipped model
    g = grids["shipped dream_tiny.shapes"]
    n = min(16, len(g["captions"]))
    idx = list(range(0, n // 2)) + list(range(len(bench.single), len(bench.single) + n - n // 2))
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
