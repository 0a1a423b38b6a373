"""One tiny DreamSync round end to end, on a random dream_test pipeline and on a tiny random Stable Diffusion folder
(each well under 30 s): the run folder and report schema, resume from inside a round without recomputing finished
stages, a judge failing on one image, and a round where nothing passes.

Random models are judged by stand-in judges (the plug points of dream.align.judges): a score per image from a hash
of its pixels, so roughly half the candidates pass a 0.3 threshold whatever the models draw, deterministically."""
from __future__ import annotations

import collections
import hashlib
import json
import warnings

import pytest
import torch
from sd_helpers import hf_clip_tokenizer, save_sd_folder, write_clip_tokenizer

import dream
from dream.align import DreamGenerator, DreamSync, DreamSyncConfig
from dream.align.sd import DiffusersGenerator
from dream.models.tokenizers import PixelTokenizer
from dream.pipeline import DreamPipeline

PIX = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3,
       "num_sampling_steps": "5"}
EVAL_PROMPTS, GRID_PROMPTS = 4, 2
BASE = dict(num_prompts=4, rounds=1, k=2, eval_prompts=EVAL_PROMPTS, num_real=16, grid_prompts=GRID_PROMPTS,
            chunk_prompts=2, batch_size=16, selection={"theta_f": 0.3, "theta_a": 0.3},
            lora={"rank": 4, "alpha": 8.0, "min_steps": 3, "max_steps": 3, "batch_size": 4, "lr": 1e-3})
SD_SAMPLER = {"num_inference_steps": 2, "guidance_scale": 2.0}


class HashJudge:
    """A stand-in judge: a score in [0, 1) per image from a sha256 of its pixels (``salt`` makes another judge).
    Serves as the faithfulness judge (``score(images, prompts, qa)``) and the aesthetic one (``score(images)``)."""

    def __init__(self, salt: str = "f"):
        self.salt, self.calls = salt.encode(), 0

    def score(self, images, *args):
        self.calls += 1
        return torch.tensor([int(hashlib.sha256(self.salt + im.numpy().tobytes()).hexdigest()[:8], 16) / 16 ** 8
                             for im in images])


class Interrupted(BaseException):
    """Stands for a KeyboardInterrupt / a killed job: not an Exception, so no judge guard swallows it."""


class InterruptingJudge(HashJudge):
    def score(self, images, *args):
        raise Interrupted()


class OneBadImage(HashJudge):
    """Raises on one image: the ``bad``-th image of the first batch it sees, recognised by its pixels after."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad, self.poison = bad, None

    def score(self, images, *args):
        if self.poison is None:
            self.poison = images[self.bad].numpy().tobytes()
        if any(im.numpy().tobytes() == self.poison for im in images):
            raise RuntimeError("the judge cannot read this image")
        return super().score(images)


class Counting:
    """The generator protocol around a real generator, counting calls (and interrupting ``finetune_lora`` on
    request): how the resume test sees which stages run."""

    def __init__(self, inner, interrupt_finetune: bool = False):
        self.inner, self.calls, self.interrupt = inner, collections.Counter(), interrupt_finetune

    def generate(self, prompts, seed):
        self.calls["images"] += len(prompts)
        return self.inner.generate(prompts, seed)

    def finetune_lora(self, *args, **kw):
        self.calls["finetune"] += 1
        if self.interrupt:
            raise Interrupted()
        return self.inner.finetune_lora(*args, **kw)

    def save_lora(self, path, format="peft"):
        return self.inner.save_lora(path, format=format)

    @property
    def lora_module(self):
        return self.inner.lora_module

    def merge_lora(self):
        self.inner.merge_lora()

    def load_lora(self, path, weight=1.0):
        self.inner.load_lora(path, weight=weight)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_sd_folder(root / "latent", hf_clip_tokenizer(write_clip_tokenizer(root / "tok")), latent=True)


def dream_generator() -> DreamGenerator:
    """A random dream_test pipeline on 32x32 pixels (4x4 patches of 8x8), random text encoder, 2 MAR steps. The
    diffusion head's zero-initialised output layers are perturbed, else its output ignores the decoder and no
    gradient reaches a decoder LoRA."""
    torch.manual_seed(0)
    model = dream.create_model("dream_test", **PIX)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return DreamGenerator(DreamPipeline(model, PixelTokenizer(8, 32), text_encoder="random"), batch_size=16,
                          sampler={"num_iter": 2})


def sd_generator(folder) -> DiffusersGenerator:
    from dream.align.generators import load_generator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_generator(folder, batch_size=16, sampler=SD_SAMPLER)


def run(out, model="dream_test", generator=None, judge=None, aesthetic=None, resume=False, **cfg):
    config = DreamSyncConfig(model=str(model), **{**BASE, **cfg})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deprecated|safety|steps_offset).*")
        ds = DreamSync(config, out, resume=resume, generator=generator, judge=judge or HashJudge("f"),
                       aesthetic=aesthetic or HashJudge("a"), progress=False)
        return ds, ds.run()


EVAL_KEYS = {"prompt_accuracy", "prompt_accuracy_se", "per_type", "geneval", "geneval_se", "over_count_rate",
             "question_accuracy", "dsg_score", "tifa_score", "n_prompts", "fid_cnn", "seconds_per_image"}


def check_run_folder(out, report, trained: bool = True):
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"config.json", "prompts.jsonl", "eval_prompts.json", "report.json", "grid.png", "accuracy.png",
                "round0/eval.json", "round0/grid.pt", "round1/candidates/0000.pt", "round1/candidates/0001.pt",
                "round1/scores.pt", "round1/selection.json", "round1/train.json", "round1/eval.json",
                "round1/grid.pt", "round1/generation.json"}
    adapter = {"round1/lora/adapter_config.json", "round1/lora/adapter_model.safetensors",
               "round1/lora_diffusers/pytorch_lora_weights.safetensors",
               "final_lora/adapter_config.json", "final_lora/adapter_model.safetensors"}   # the rounds combined
    assert files == expected | (adapter if trained else set()), files ^ (expected | adapter)
    saved = json.loads((out / "report.json").read_text())
    assert json.dumps(saved, sort_keys=True) == json.dumps(report, sort_keys=True)     # as text: NaN scores
    assert set(report) == {"config", "base", "rounds", "final_adapter"} and len(report["rounds"]) == 1
    assert (report["final_adapter"] is not None) == trained
    assert DreamSyncConfig.from_dict(report["config"]) == DreamSyncConfig.load(out / "config.json")
    r1 = report["rounds"][0]
    assert set(r1) == {"selection", "train", "eval", "generation"}
    for ev in (report["base"], r1["eval"]):
        assert EVAL_KEYS <= set(ev) and ev["n_prompts"] == EVAL_PROMPTS and 0 <= ev["prompt_accuracy"] <= 1
    assert {"acceptance_rate", "kept", "judge_failures", "mean_s_f_all", "control"} <= set(r1["selection"])
    assert "pairs" not in r1["selection"]
    sel = json.loads((out / "round1/selection.json").read_text())
    assert sel["kept"] == len(sel["pairs"]) and all(0 <= p < 4 and 0 <= k < 2 for p, k in sel["pairs"])
    cands = torch.load(out / "round1/candidates/0000.pt", weights_only=True)["images"]
    assert cands.dtype == torch.uint8 and cands.shape == (2, 2, 3, 32, 32)
    scores = torch.load(out / "round1/scores.pt", weights_only=True)
    assert scores["s_f"].shape == (4, 2) and scores["s_a"].shape == (4, 2)
    grid = torch.load(out / "round1/grid.pt", weights_only=True)
    assert len(grid["captions"]) == GRID_PROMPTS and grid["images"].shape == (GRID_PROMPTS, 3, 32, 32)
    if trained:
        assert sel["pairs"] and r1["train"]["steps"] == 3 and r1["train"]["pairs"] == sel["kept"]
        assert r1["train"]["loss_first"] == r1["train"]["loss_first"]          # finite (not NaN)
    return sel


# ---- one round end to end --------------------------------------------------------------------------------------
def test_one_round_on_a_tiny_dream_pipeline(tmp_path):
    gen = dream_generator()
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    _, report = run(tmp_path / "run", generator=gen)
    check_run_folder(tmp_path / "run", report)
    after = gen.model.state_dict()
    assert after.keys() == before.keys()                       # merged and unloaded: plain weights again
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_dream_finetune_depends_only_on_its_generator():
    """A resumed run retrains a round in another process: the adapter (peft's random init of A included) must come
    from the generator passed in, not from the global RNG's state."""
    from dream.adapters import adapter_state_dict
    from dream.align import LoraTrainConfig

    out = []
    for global_seed in (0, 5):
        gen = dream_generator()
        images = gen.generate(["a red square", "two blue circles"], 0)
        torch.manual_seed(global_seed)
        info = gen.finetune_lora(["a red square", "two blue circles"], images, LoraTrainConfig(rank=4, min_steps=2,
                                 max_steps=2, batch_size=2), torch.Generator().manual_seed(0))
        out.append((info["losses"], adapter_state_dict(gen.model)))
    (la, sa), (lb, sb) = out
    assert la == lb and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(float(v.abs().max()) > 0 for k, v in sa.items() if "lora_B" in k)      # the decoder LoRA learned


def test_one_round_on_a_tiny_stable_diffusion_folder(tmp_path, sd_folder):
    """The generator is built from the config (model = the folder, sampler, batch size) through load_generator."""
    ds, report = run(tmp_path / "run", model=sd_folder, sampler=SD_SAMPLER)
    assert isinstance(ds.gen, DiffusersGenerator) and ds.gen.sampler["num_inference_steps"] == 2
    check_run_folder(tmp_path / "run", report)
    assert not any(hasattr(m, "lora_A") for m in ds.gen.unet.modules())       # the round's adapter is merged


# ---- resume ----------------------------------------------------------------------------------------------------
def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if k not in ("seconds", "seconds_per_image")}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def test_resume_inside_a_round_recomputes_nothing_finished(tmp_path, sd_folder):
    """Interrupted while judging (candidates written), then while fine-tuning (scores and selection written): each
    resume reuses the files of the finished stages (no image generated again, no judge called again, the files
    untouched) and the final report equals an uninterrupted run's, timings aside."""
    kw = dict(model=sd_folder, sampler=SD_SAMPLER)
    _, ref = run(tmp_path / "ref", generator=sd_generator(sd_folder), **kw)

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(out, generator=sd_generator(sd_folder), aesthetic=InterruptingJudge(), **kw)
    chunks = sorted((out / "round1" / "candidates").glob("*.pt"))
    assert len(chunks) == 2 and not (out / "round1" / "scores.pt").exists()
    stamps = {p: p.stat().st_mtime_ns for p in chunks + [out / "round0" / "eval.json"]}

    gen, judge = Counting(sd_generator(sd_folder), interrupt_finetune=True), HashJudge("f")
    with pytest.raises(Interrupted):
        run(out, generator=gen, judge=judge, resume=True, **kw)
    assert gen.calls["images"] == 0 and gen.calls["finetune"] == 1 and judge.calls == 1
    assert (out / "round1" / "selection.json").exists() and not (out / "round1" / "train.json").exists()
    stamps.update({p: p.stat().st_mtime_ns for p in (out / "round1" / "scores.pt", out / "round1" / "selection.json")})

    gen, judge, aesthetic = Counting(sd_generator(sd_folder)), HashJudge("f"), HashJudge("a")
    _, report = run(out, generator=gen, judge=judge, aesthetic=aesthetic, resume=True, **kw)
    assert judge.calls == 0 and aesthetic.calls == 0 and gen.calls["finetune"] == 1
    assert gen.calls["images"] == EVAL_PROMPTS + GRID_PROMPTS            # only round 1's evaluation and grid
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    check_run_folder(out, report)
    assert json.dumps(_strip_times(report), sort_keys=True) == json.dumps(_strip_times(ref), sort_keys=True)


# ---- failing judges and empty rounds ---------------------------------------------------------------------------
def test_a_judge_failing_on_one_image_fails_only_that_candidate(tmp_path):
    """Image 3 of the flattened candidates is prompt 1's second candidate: its S_F is NaN (a failed candidate, never
    selected), every other candidate is scored, and the round trains as usual."""
    _, report = run(tmp_path / "run", generator=dream_generator(), judge=OneBadImage(bad=3),
                    selection={"theta_f": 0.0, "theta_a": 0.0})
    scores = torch.load(tmp_path / "run" / "round1" / "scores.pt", weights_only=True)
    nan = torch.isnan(scores["s_f"])
    assert scores["failed"] == 1 and nan.sum() == 1 and bool(nan[1, 1])
    sel = check_run_folder(tmp_path / "run", report)
    assert report["rounds"][0]["selection"]["judge_failures"] == 1
    best = [int(scores["s_f"][p].argmax()) for p in range(4)]
    assert [tuple(p) for p in sel["pairs"]] == [(0, best[0]), (1, 0), (2, best[2]), (3, best[3])]


class Zero(HashJudge):
    def score(self, images, *args):
        return torch.zeros(images.shape[0])


def test_a_round_where_nothing_passes_is_skipped_and_the_run_finishes(tmp_path, sd_folder):
    gen = sd_generator(sd_folder)
    with pytest.warns(UserWarning, match="no candidate passed selection"):
        _, report = run(tmp_path / "run", model=sd_folder, generator=gen, judge=Zero(), sampler=SD_SAMPLER)
    check_run_folder(tmp_path / "run", report, trained=False)
    r1 = report["rounds"][0]
    assert r1["train"] == {"skipped": True, "reason": "no candidate passed selection"}
    assert r1["selection"]["kept"] == 0 and r1["selection"]["acceptance_rate"] == 0.0
    assert not any(hasattr(m, "lora_A") for m in gen.unet.modules())
    # the model did not change: round 1 evaluates the same images as round 0
    g0 = torch.load(tmp_path / "run" / "round0" / "grid.pt", weights_only=True)["images"]
    g1 = torch.load(tmp_path / "run" / "round1" / "grid.pt", weights_only=True)["images"]
    assert torch.equal(g0, g1)
