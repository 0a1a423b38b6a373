"""``ShapesBench``: held-out ShapesWorld data and every evaluator ``dream demo`` runs on a pipeline.

Understanding: image->text / text->image retrieval on real held-out images and a linear probe on object colour
from frozen encoder features (buffer-mean, as the official probe). Generation: plain and SAD sampling of
held-out prompts, scored by the exact ShapesWorld verifier (per question type, whole prompt), single-object
colour / shape accuracy with binomial standard errors, and FID on the shipped ShapesWorld CNN's features.
"""
from __future__ import annotations

import math
import time

import torch

__all__ = ["ShapesBench"]


class ShapesBench:
    """Held-out ShapesWorld data and the evaluators shared by every model in the demo."""

    def __init__(self, num_prompts: int, num_real: int, image_size: int = 32, num_single: int = 0):
        from dream.data.shapes import ShapesConfig, ShapesWorld
        from dream.eval.compositional import Verifier
        from dream.eval.shapes_features import load_shapes_feature_extractor

        self.world = ShapesWorld(ShapesConfig(image_size=image_size))
        self.verifier = Verifier(self.world.config)
        self.features = load_shapes_feature_extractor()
        self.real, self.real_caps, self.real_meta = self.world.batch(range(num_real), "test")
        half = num_prompts // 2
        # single-object prompts: colour / shape accuracy on all of them; the first `half` also join the
        # compositional set (with `num_prompts - half` mixed prompts)
        self.single = self.world.random_prompt_specs(max(half, num_single), "test", types=("single",))
        self.mixed = self.world.random_prompt_specs(num_prompts - half, "val")
        self.prompts = self.single[:half] + self.mixed
        self.extra_single = self.single[half:]
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
        every = self.prompts + self.extra_single
        caps = [p.caption for p in every]
        specs = [p.spec for p in every]
        n_comp, half = len(self.prompts), len(self.single) - len(self.extra_single)
        single_idx = list(range(half)) + list(range(n_comp, len(every)))
        single_specs = [specs[i] for i in single_idx]
        out, images = {}, {}
        for name, kw in (("plain", {}), ("sad", {"sad": sad})):
            t0 = time.time()
            imgs = pipe.generate(caps, num_iter=num_iter, cfg=cfg, temperature=temperature, seed=seed,
                                 cfg_schedule=cfg_schedule,
                                 batch_size=min(len(caps), 160), progress=True, **kw)
            dt = time.time() - t0
            sc = self.verifier.score(imgs[:n_comp], specs[:n_comp], details=False)
            single_imgs = imgs[single_idx]
            colour = self.verifier.colour_accuracy(single_imgs, single_specs)
            shape = self.verifier.shape_accuracy(single_imgs, single_specs)
            n1 = len(single_idx)
            out[name] = {"seconds_per_image": dt / len(caps),
                         "single_object_n": n1,
                         "single_object_colour_acc": colour,
                         "single_object_colour_acc_se": math.sqrt(colour * (1 - colour) / n1),
                         "single_object_shape_acc": shape,
                         "single_object_shape_acc_se": math.sqrt(shape * (1 - shape) / n1),
                         "accuracy_per_question_type": sc["accuracy"],
                         "prompt_accuracy": sc["prompt_accuracy"], "question_accuracy": sc["question_accuracy"],
                         "fid_shapes_cnn": self.fid(imgs[:n_comp])}
            images[name] = imgs[:n_comp]
        return {"metrics": out, "images": images, "captions": caps[:n_comp]}

    def evaluate(self, pipe, num_iter, cfg, temperature, sad, seed, cfg_schedule=None) -> tuple[dict, dict]:
        und = self.understanding(pipe)
        gen = self.generation(pipe, num_iter, cfg, temperature, sad, seed, cfg_schedule)
        return {"understanding": und, "generation": gen["metrics"]}, gen
