"""DreamSync (Sun et al., arXiv 2311.17946): generate -> judge -> select -> LoRA -> merge, for a few rounds.

Each round, for every training prompt, the current model draws ``k`` candidates; a VQA judge scores their
faithfulness S_F on the prompt's questions (TIFA / DSG) and an aesthetic judge their quality S_A; the best
candidate passing ``S_F >= theta_f`` and ``S_A >= theta_a`` is kept (:mod:`dream.align.selection`); a fresh LoRA is
fine-tuned on the kept (prompt, image) pairs with the model's own loss, merged, and the next round starts from the
merged model. No human labels, no reward model, no architecture change.

Model-agnostic: the generator is anything with the :class:`~dream.align.generators.T2IGenerator` protocol (a DREAM
pipeline or a diffusers Stable Diffusion pipeline), the judges anything with the protocols of
:mod:`dream.align.judges`. The default setting is the project's ShapesWorld one: prompts and exact question sets
from ShapesWorld's train split, the verifier's *selection* variant as the VQA judge, a render-quality proxy as the
aesthetic judge, and evaluation on held-out prompts with GenEval-shapes (the verifier's *evaluation* variant).

Run folder (every stage writes its result atomically; ``resume=True`` skips what is done, including candidate
chunks, so a run continues from the stage it stopped in)::

    config.json  prompts.jsonl (prompts + question sets)  eval_prompts.json
    round0/eval.json, grid.pt                     the base model
    roundR/candidates/NNNN.pt                     uint8 candidates (P, K, 3, H, W), a chunk of prompts each
          /scores.pt  selection.json  lora/ (peft)  lora_diffusers/  train.json  eval.json  grid.pt
    report.json  grid.png (same prompts and seeds, round 0..R side by side)  accuracy.png
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from dream.utils.config import ConfigBase

from .generators import LoraTrainConfig
from .selection import SelectionConfig, random_like, select

log = logging.getLogger("dream.align.dreamsync")

__all__ = ["DreamSyncConfig", "DreamSync", "safe_scores"]


@dataclass(frozen=True)
class DreamSyncConfig(ConfigBase):
    # --- model and prompts ---
    model: str = "dream_tiny.shapes"          # pipeline tag / folder (DREAM or a diffusers SD folder)
    num_prompts: int = 1000                    # ShapesWorld training prompts (train split) ...
    type_weights: tuple = (0.1, 0.4, 0.1, 0.4)  # ... over (single, count, pair, relation): counts and relations
    prompt_seed: int = 0
    prompt_file: Optional[str] = None          # or your own prompts + question sets (dream.align.questions)
    # --- rounds ---
    rounds: int = 3
    k: int = 8                                 # candidates per prompt
    keep: Optional[int] = None                 # DREAM only: finish the best `keep` of `k` scored at `tau`
    tau: float = 0.25
    # --- judges and selection ---
    judge: str = "verifier"                    # verifier | self | hf:PATH (a local BLIP VQA folder)
    judge_mode: str = "dsg"                    # tifa | dsg | mean
    verifier_variant: str = "selection"
    aesthetic: str = "shapes"                  # shapes | none | laion:CLIP_DIR,MLP_FILE
    selection: dict = field(default_factory=dict)   # SelectionConfig fields (theta_f 0.9, theta_a 0.6, policy, ...)
    control: str = "none"                      # none | random (same prompts and count, random candidates)
    # --- fine-tuning ---
    lora: dict = field(default_factory=dict)   # LoraTrainConfig fields
    # --- evaluation ---
    eval_prompts: int = 300
    eval_prompt_seed: int = 0
    eval_seed: int = 1234
    num_real: int = 1000
    grid_prompts: int = 8
    # --- runtime ---
    sampler: dict = field(default_factory=dict)          # the generator's sampler settings (everywhere)
    candidate_sampler: dict = field(default_factory=dict)  # overrides for the candidates only (e.g. fewer steps);
                                                           # the per-round evaluation keeps `sampler`
    batch_size: int = 128
    chunk_prompts: int = 64                    # prompts per candidate file (resume granularity)
    seed: int = 0
    device: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.rounds < 1 or self.k < 1:
            raise ValueError(f"need rounds >= 1 and k >= 1, got {self.rounds}, {self.k}")
        if self.keep is not None and not 1 <= self.keep <= self.k:
            raise ValueError(f"keep must be in [1, k={self.k}], got {self.keep}")
        if self.control not in ("none", "random"):
            raise ValueError(f"unknown control {self.control!r} (none | random)")
        if not (self.judge in ("verifier", "self") or self.judge.startswith("hf:")):
            raise ValueError(f"unknown judge {self.judge!r} (verifier | self | hf:PATH)")
        if not (self.aesthetic in ("shapes", "none") or self.aesthetic.startswith("laion:")):
            raise ValueError(f"unknown aesthetic judge {self.aesthetic!r} (shapes | none | laion:CLIP_DIR,MLP_FILE)")
        SelectionConfig.from_dict(self.selection)
        LoraTrainConfig.from_dict(self.lora)

    @property
    def selection_config(self) -> SelectionConfig:
        return SelectionConfig.from_dict(self.selection)

    @property
    def lora_config(self) -> LoraTrainConfig:
        return LoraTrainConfig.from_dict(self.lora)


def safe_scores(fn, images: torch.Tensor, *args) -> tuple[torch.Tensor, int]:
    """``fn(images, *args)`` as a float tensor; if it raises, image by image, and an image whose call raises gets
    NaN (a failed candidate: it never passes selection). Returns (scores, number of failed images)."""
    try:
        return torch.as_tensor(fn(images, *args), dtype=torch.float32).flatten(), 0
    except Exception as e:  # noqa: BLE001 - a judge failing on one image must not stop the loop
        log.warning("judge failed on a batch (%s: %s); scoring image by image", type(e).__name__, e)
    out, failed = [], 0
    for i in range(images.shape[0]):
        one = [a[i: i + 1] if isinstance(a, torch.Tensor) else a[i: i + 1] for a in args]
        try:
            out.append(float(torch.as_tensor(fn(images[i: i + 1], *one)).flatten()[0]))
        except Exception as e:  # noqa: BLE001
            out.append(float("nan"))
            failed += 1
            log.warning("judge failed on image %d: %s: %s", i, type(e).__name__, e)
    return torch.tensor(out, dtype=torch.float32), failed


@contextlib.contextmanager
def _sampler_overrides(gen, overrides: dict):
    """Temporarily apply sampler ``overrides`` to a generator with a ``sampler`` dict (both built-in ones)."""
    if not overrides:
        yield
        return
    if not isinstance(getattr(gen, "sampler", None), dict):
        raise TypeError(f"candidate_sampler needs a generator with a `sampler` dict; {type(gen).__name__} has none")
    saved = gen.sampler
    gen.sampler = {**saved, **overrides}
    try:
        yield
    finally:
        gen.sampler = saved


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _atomic_save(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images


class DreamSync:
    """Runs a :class:`DreamSyncConfig` into ``out`` (see the module docstring for the folder layout).

    ``generator``, ``judge``, ``aesthetic`` may be passed in (any object with the protocols), else they are built
    from the config."""

    def __init__(self, config: DreamSyncConfig, out, resume: bool = False, generator=None, judge=None,
                 aesthetic=None, progress: bool = True):
        self.cfg, self.out = config, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "config.json"
        if saved.exists() and resume:
            old = DreamSyncConfig.load(saved)
            if old != config:
                raise ValueError(f"{saved} holds another configuration; resume with the same config or use a new "
                                 "--out folder")
        config.save(saved)
        self.progress = progress
        from .generators import load_generator

        self.gen = generator if generator is not None else load_generator(
            config.model, device=config.device, batch_size=config.batch_size, sampler=config.sampler)
        self._judge, self._aesthetic = judge, aesthetic
        self._bench = None

    # ---- components --------------------------------------------------------------------------------
    @property
    def judge(self):
        if self._judge is None:
            from .judges import DreamSelfJudge, HFVQA, ShapesVQA, VQAJudge

            c = self.cfg
            if c.judge == "verifier":
                self._judge = VQAJudge(ShapesVQA(c.verifier_variant), c.judge_mode)
            elif c.judge == "self":
                self._judge = DreamSelfJudge(self.gen.pipe)
            else:
                self._judge = VQAJudge(HFVQA(c.judge[3:], device=c.device), c.judge_mode)
        return self._judge

    @property
    def aesthetic(self):
        if self._aesthetic is None and self.cfg.aesthetic != "none":
            from .judges import LaionAestheticJudge, ShapesAestheticJudge

            if self.cfg.aesthetic == "shapes":
                self._aesthetic = ShapesAestheticJudge()
            else:
                clip, _, mlp = self.cfg.aesthetic[6:].partition(",")
                self._aesthetic = LaionAestheticJudge(clip, mlp, device=self.cfg.device)
        return self._aesthetic

    @property
    def bench(self):
        if self._bench is None:
            from dream.eval.geneval_shapes import GenEvalShapes

            self._bench = GenEvalShapes(num_real=self.cfg.num_real)
        return self._bench

    # ---- prompts -------------------------------------------------------------------------------------
    def prompts(self) -> tuple[list[str], list[dict]]:
        """Training prompts and their question sets (written once to prompts.jsonl)."""
        from .questions import load_question_sets, save_question_sets, shapes_question_sets

        f = self.out / "prompts.jsonl"
        if not f.exists():
            c = self.cfg
            if c.prompt_file:
                prompts, sets = load_question_sets(c.prompt_file)
            else:
                from dream.data.shapes import ShapesConfig, ShapesWorld

                world = ShapesWorld(ShapesConfig(type_weights=tuple(c.type_weights)))
                ps = world.random_prompt_specs(c.num_prompts, "train",
                                               generator=torch.Generator().manual_seed(c.prompt_seed))
                prompts = [p.caption for p in ps]
                sets = [shapes_question_sets(p.spec, p.caption) for p in ps]
            tmp = f.with_name(f.name + ".tmp")
            save_question_sets(tmp, prompts, sets)
            os.replace(tmp, f)
        return load_question_sets(f)

    def eval_prompts(self):
        """Held-out GenEval-shapes prompts (test split), none equal to a training prompt."""
        from dream.data.shapes import ShapesPrompt
        from dream.eval.geneval_shapes import geneval_prompts

        f = self.out / "eval_prompts.json"
        if not f.exists():
            train = set(self.prompts()[0])
            ps = geneval_prompts(self.cfg.eval_prompts, self.cfg.eval_prompt_seed, exclude=train)
            _atomic_json(f, [{"caption": p.caption, "spec": p.spec} for p in ps])
        return [ShapesPrompt(d["caption"], d["spec"]) for d in json.loads(f.read_text())]

    # ---- stages --------------------------------------------------------------------------------------
    def _round_dir(self, r: int) -> Path:
        d = self.out / f"round{r}"
        d.mkdir(exist_ok=True)
        return d

    def _evaluate(self, r: int) -> dict:
        d = self._round_dir(r)
        f = d / "eval.json"
        if f.exists():
            return json.loads(f.read_text())
        ps = self.eval_prompts()
        rep = self.bench.run(lambda caps: self.gen.generate(caps, self.cfg.eval_seed), ps)
        grid = [p.caption for p in ps[: self.cfg.grid_prompts]]
        _atomic_save(d / "grid.pt", {"captions": grid, "images": _to_uint8(self.gen.generate(grid, self.cfg.eval_seed))})
        _atomic_json(f, rep)
        return rep

    def _candidates(self, r: int, prompts: list[str]) -> torch.Tensor:
        c = self.cfg
        d = self._round_dir(r) / "candidates"
        d.mkdir(exist_ok=True)
        chunks = []
        n_chunks = math.ceil(len(prompts) / c.chunk_prompts)
        with _sampler_overrides(self.gen, c.candidate_sampler):
            self._candidate_chunks(r, prompts, d, n_chunks)
        for j in range(n_chunks):
            chunks.append(torch.load(d / f"{j:04d}.pt", weights_only=True))
        stats = {"seconds": sum(x["stats"]["seconds"] for x in chunks)}
        _atomic_json(self._round_dir(r) / "generation.json", stats)
        return torch.cat([x["images"] for x in chunks])

    def _candidate_chunks(self, r: int, prompts: list[str], d: Path, n_chunks: int) -> None:
        c = self.cfg
        for j in tqdm(range(n_chunks), disable=not self.progress, desc=f"round {r}: generate"):
            f = d / f"{j:04d}.pt"
            if not f.exists():
                part = prompts[j * c.chunk_prompts: (j + 1) * c.chunk_prompts]
                seed = c.seed * 1_000_003 + r * 10_007 + j
                if c.keep is not None and c.keep < c.k and hasattr(self.gen, "candidates"):
                    imgs, stats = self.gen.candidates(part, c.k, seed, keep=c.keep, tau=c.tau)
                else:
                    t0 = time.time()
                    flat = self.gen.generate([p for p in part for _ in range(c.k)], seed)
                    imgs = flat.view(len(part), c.k, *flat.shape[1:])
                    stats = {"seconds": time.time() - t0}
                _atomic_save(f, {"images": _to_uint8(imgs), "stats": stats})

    def _scores(self, r: int, prompts: list[str], sets: list[dict], cands: torch.Tensor) -> dict:
        f = self._round_dir(r) / "scores.pt"
        if f.exists():
            return torch.load(f, weights_only=True)
        P, K = cands.shape[:2]
        flat = _to_float(cands.flatten(0, 1))
        rep_prompts = [p for p in prompts for _ in range(K)]
        rep_sets = [s for s in sets for _ in range(K)]
        s_f, s_a, failed = [], [], 0
        bs = 512
        for i in tqdm(range(0, P * K, bs), disable=not self.progress, desc=f"round {r}: judge"):
            sf, nf = safe_scores(lambda im, p, q: self.judge.score(im, p, q), flat[i: i + bs],
                                 rep_prompts[i: i + bs], rep_sets[i: i + bs])
            s_f.append(sf)
            failed += nf
            if self.aesthetic is not None:
                sa, na = safe_scores(self.aesthetic.score, flat[i: i + bs])
                s_a.append(sa)
                failed += na
        out = {"s_f": torch.cat(s_f).view(P, K), "s_a": torch.cat(s_a).view(P, K) if s_a else None,
               "failed": failed}
        _atomic_save(f, out)
        return out

    def _select(self, r: int, scores: dict) -> dict:
        f = self._round_dir(r) / "selection.json"
        if f.exists():
            return json.loads(f.read_text())
        c = self.cfg
        pairs = select(scores["s_f"], scores["s_a"], c.selection_config)
        if c.control == "random":
            pairs = random_like(pairs, c.k, torch.Generator().manual_seed(c.seed * 7919 + r))
        P = scores["s_f"].shape[0]
        s_f, s_a = scores["s_f"], scores["s_a"]
        kept_f = [float(s_f[p, k]) for p, k in pairs]
        kept_a = [float(s_a[p, k]) for p, k in pairs] if s_a is not None else []
        res = {"pairs": pairs, "acceptance_rate": len({p for p, _ in pairs}) / P, "kept": len(pairs),
               "mean_s_f_kept": sum(kept_f) / len(kept_f) if kept_f else None,
               "mean_s_a_kept": sum(kept_a) / len(kept_a) if kept_a else None,
               "mean_s_f_all": float(s_f.nan_to_num(0.0).mean()), "judge_failures": scores["failed"],
               "control": c.control}
        _atomic_json(f, res)
        return res

    def _train(self, r: int, prompts: list[str], cands: torch.Tensor, sel: dict) -> Optional[dict]:
        d = self._round_dir(r)
        f = d / "train.json"
        if f.exists():
            info = json.loads(f.read_text())
            if info.get("skipped"):
                return info
            self.gen.load_lora(d / "lora")           # rebuild: the round's adapter, merged below
            self.gen.merge_lora()
            return info
        pairs = sel["pairs"]
        if not pairs:
            warnings.warn(f"DreamSync round {r}: no candidate passed selection; the round is skipped (no LoRA)")
            info = {"skipped": True, "reason": "no candidate passed selection"}
            _atomic_json(f, info)
            return info
        images = _to_float(torch.stack([cands[p, k] for p, k in pairs]))
        g = torch.Generator().manual_seed(self.cfg.seed * 31 + r)
        info = self.gen.finetune_lora([prompts[p] for p, _ in pairs], images, self.cfg.lora_config, g,
                                      progress=self.progress)
        self.gen.save_lora(d / "lora", format="peft")
        try:
            self.gen.save_lora(d / "lora_diffusers", format="diffusers")
        except Exception as e:  # noqa: BLE001 - the diffusers layout is a convenience copy
            log.warning("round %d: diffusers-format copy of the adapter not written: %s", r, e)
        self.gen.merge_lora()
        info = {k: v for k, v in info.items() if k != "losses"} | {"losses": info.get("losses", [])[::10]}
        _atomic_json(f, info)
        return info

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        prompts, sets = self.prompts()
        report = {"config": c.to_dict(), "rounds": []}
        report["base"] = self._evaluate(0)
        for r in range(1, c.rounds + 1):
            d = self._round_dir(r)
            if (d / "eval.json").exists() and (d / "train.json").exists():
                self._train(r, prompts, None, None)          # resume past a finished round: re-apply its adapter
            else:
                cands = self._candidates(r, prompts)
                sel = self._select(r, self._scores(r, prompts, sets, cands))
                self._train(r, prompts, cands, sel)
                self._evaluate(r)
            entry = {k: json.loads((d / f"{k}.json").read_text()) for k in ("selection", "train", "eval", "generation")
                     if (d / f"{k}.json").exists()}
            report["rounds"].append(entry)
            log.info("round %d: acceptance %.3f, prompt accuracy %.3f", r, entry["selection"]["acceptance_rate"],
                     entry["eval"]["prompt_accuracy"])
        for e in report["rounds"]:
            e.get("selection", {}).pop("pairs", None)
        report["final_adapter"] = self._final_adapter()
        self._figures(report)
        _atomic_json(self.out / "report.json", report)
        return report

    def _final_adapter(self) -> Optional[str]:
        """The rounds' adapters combined into one (``final_lora/``, peft; ``final_lora_diffusers/`` too when the
        model is a diffusers UNet): loaded on the base model it gives the final round's model."""
        from dream.adapters import combine_lora, read_lora_file, write_lora_file

        rounds = [self._round_dir(r) / "lora" for r in range(1, self.cfg.rounds + 1)]
        rounds = [d for d in rounds if d.exists()]
        if not rounds:
            return None
        module = self.gen.lora_module
        weights = combine_lora([read_lora_file(d, module) for d in rounds])
        path = write_lora_file(weights, module, self.out / "final_lora", "peft")
        return Path(path).relative_to(self.out).as_posix()          # relative to the run folder

    def _figures(self, report: dict) -> None:
        from dream.utils.images import save_grid
        from dream.utils.plots import plot_curves

        grids = [torch.load(self._round_dir(r) / "grid.pt", weights_only=True) for r in range(len(report["rounds"]) + 1)]
        n = len(grids[0]["captions"])
        imgs = torch.stack([g["images"][i] for i in range(n) for g in grids])
        caps = [f"r{r}: {grids[0]['captions'][i]}" if r == 0 else f"r{r}" for i in range(n) for r in range(len(grids))]
        save_grid(imgs, caps, self.out / "grid.png", ncol=len(grids))
        evs = [report["base"]] + [e["eval"] for e in report["rounds"]]
        curves = {"prompt accuracy": [e["prompt_accuracy"] for e in evs],
                  "GenEval overall": [e["geneval"]["overall"] for e in evs],
                  "counting": [e["geneval"]["counting"] for e in evs],
                  "position": [e["geneval"]["position"] for e in evs]}
        plot_curves(curves, self.out / "accuracy.png", xlabel="round", title="DreamSync: held-out accuracy per round")
