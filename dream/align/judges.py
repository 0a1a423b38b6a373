"""Judges for DreamSync (arXiv 2311.17946): faithfulness S_F (a VQA model answering a prompt's TIFA / DSG questions,
or DREAM scoring itself) and aesthetics S_A, both in [0, 1]. Each is a small class behind a protocol, so users
plug their own:

* :class:`FaithfulnessJudge`: ``score(images, prompts, qa) -> (N,)``; :class:`VQAJudge` turns any
  :class:`VQAModel` (``answer(images, question_sets) -> answers``) into one, with the TIFA / DSG / mean scores of
  :mod:`dream.align.questions`.
* :class:`ShapesVQA`: the exact ShapesWorld verifier as the VQA model, in named threshold *variants*: DreamSync
  selects with ``"selection"`` and the evaluation (:mod:`dream.eval.geneval_shapes`) uses ``"evaluation"``, so
  selection cannot overfit the exact parser the method is measured with.
* :class:`HFVQA`: a Hugging Face VQA model (BLIP) from a local folder (``transformers``); free-form answers are
  mapped to the nearest choice as TIFA does.
* :class:`DreamSelfJudge`: DREAM as its own judge, no external model: the probability its contrastive head gives
  the prompt against hard negatives of it (same objects, one attribute changed).
* Aesthetics (:class:`AestheticJudge`): :class:`ShapesAestheticJudge` (a ShapesWorld render-quality proxy: stray
  colour off the objects and how well objects match a clean shape) and :class:`LaionAestheticJudge` (the LAION
  aesthetic predictor: an MLP over normalised CLIP ViT-L/14 image embeddings, weights from local files).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

from dream.data.shapes import RELATIONS, ShapesConfig, hard_negative_specs, parse_caption
from dream.eval.compositional import Verifier, VerifierConfig, answer_questions

from .questions import faithfulness

__all__ = ["FaithfulnessJudge", "AestheticJudge", "VQAModel", "VQAJudge", "ShapesVQA", "VERIFIER_VARIANTS",
           "HFVQA", "DreamSelfJudge", "ShapesAestheticJudge", "LaionAestheticJudge", "nearest_choice"]

# Threshold variants of the ShapesWorld verifier. "evaluation" = the defaults every metric in dream.eval uses;
# "selection" sees colours and objects more strictly (a purer colour, a larger object, no merging of fragments),
# so an image it accepts is not one that only the evaluation thresholds would pass.
VERIFIER_VARIANTS = {
    "evaluation": VerifierConfig(),
    "selection": VerifierConfig(fg_threshold=0.5, max_colour_tan=0.4, min_area_frac=0.012, merge_radius=0),
}


@runtime_checkable
class FaithfulnessJudge(Protocol):
    """S_F: how faithfully each image shows its prompt, in [0, 1]."""

    def score(self, images: torch.Tensor, prompts: Sequence[str], qa: Sequence[dict]) -> torch.Tensor: ...


@runtime_checkable
class AestheticJudge(Protocol):
    """S_A: image quality in [0, 1], prompt-independent."""

    def score(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class VQAModel(Protocol):
    """Answers each image's questions: ``answers[i][style][j]`` for question j of ``question_sets[i][style]``
    (styles ``"tifa"`` / ``"dsg"``); TIFA answers must be one of the question's choices."""

    def answer(self, images: torch.Tensor, question_sets: Sequence[dict]) -> list[dict]: ...


class VQAJudge:
    """Faithfulness from a VQA model and question sets (TIFA accuracy, DSG score, or their mean)."""

    def __init__(self, vqa: VQAModel, mode: str = "dsg"):
        from .questions import MODES

        if mode not in MODES:
            raise ValueError(f"unknown faithfulness mode {mode!r} ({' | '.join(MODES)})")
        self.vqa, self.mode = vqa, mode

    def score(self, images: torch.Tensor, prompts: Sequence[str], qa: Sequence[dict]) -> torch.Tensor:
        if images.shape[0] != len(qa):
            raise ValueError(f"{images.shape[0]} images but {len(qa)} question sets")
        answers = self.vqa.answer(images, qa)
        return torch.tensor([faithfulness(q, a, self.mode) for q, a in zip(qa, answers)], dtype=torch.float32)


def nearest_choice(answer: str, choices: Sequence[str]) -> str:
    """Map a free-form answer to a choice: exact match, else the choice sharing the most words (first on ties);
    TIFA uses SBERT similarity here, this is the dependency-free stand-in."""
    a = str(answer).strip().lower()
    low = [str(c).strip().lower() for c in choices]
    if a in low:
        return choices[low.index(a)]
    words = set(a.replace("?", " ").replace(".", " ").split())
    overlap = [len(words & set(c.split())) for c in low]
    return choices[max(range(len(choices)), key=lambda i: (overlap[i], -i))]


# ----------------------------------------------------------------------------------------------------
# ShapesWorld: the exact verifier as a VQA model
# ----------------------------------------------------------------------------------------------------
class ShapesVQA:
    """Answers structured ShapesWorld queries (:func:`dream.align.questions.shapes_question_sets`) from the
    verifier's parse of each image. ``variant``: a name in :data:`VERIFIER_VARIANTS` or a VerifierConfig."""

    def __init__(self, variant="selection", shapes_config: Optional[ShapesConfig] = None):
        cfg = VERIFIER_VARIANTS[variant] if isinstance(variant, str) else variant
        if isinstance(variant, str) and variant not in VERIFIER_VARIANTS:
            raise KeyError(f"unknown verifier variant {variant!r} ({' | '.join(VERIFIER_VARIANTS)})")
        self.variant = variant if isinstance(variant, str) else "custom"
        self.verifier = Verifier(shapes_config or ShapesConfig(), cfg)

    @staticmethod
    def _match(objects, shape, colour=None):
        return [o for o in objects if o["shape"] == shape and (colour is None or o["colour"] == colour)]

    def _answer_tifa(self, q: dict, objects: list) -> str:
        x = q.get("query")
        if x is None:
            raise ValueError(f"ShapesVQA needs structured queries; question {q.get('question')!r} has none")
        kind = x["kind"]
        if kind == "exists":
            return "yes" if self._match(objects, x["shape"], x.get("colour")) else "no"
        if kind == "count":
            return str(len(self._match(objects, x["shape"], x["colour"])))
        if kind == "size_of":
            m = self._match(objects, x["shape"], x["colour"])
            return m[0]["size_class"] if m else "none"
        if kind == "relation_of":
            s, o = self._match(objects, x["subject"][1], x["subject"][0]), self._match(objects, x["object"][1],
                                                                                      x["object"][0])
            if not s or not o:
                return "none"
            dx, dy = s[0]["x"] - o[0]["x"], s[0]["y"] - o[0]["y"]
            if abs(dx) >= abs(dy):
                return RELATIONS[0] if dx < 0 else RELATIONS[1]
            return RELATIONS[2] if dy < 0 else RELATIONS[3]
        raise ValueError(f"unknown query kind {kind!r}")

    def answer(self, images: torch.Tensor, question_sets: Sequence[dict]) -> list[dict]:
        parsed = self.verifier.parse(images)
        out = []
        for objects, qa in zip(parsed, question_sets):
            ans = {}
            if qa.get("tifa"):
                ans["tifa"] = [self._answer_tifa(q, objects) for q in qa["tifa"]]
            if qa.get("dsg"):
                yes = answer_questions([dict(q["query"], id=q["id"], parents=q["parents"]) for q in qa["dsg"]],
                                       objects)
                ans["dsg"] = ["yes" if a else "no" for a in yes]
            out.append(ans)
        return out


# ----------------------------------------------------------------------------------------------------
# A Hugging Face VQA model (BLIP) from a local folder
# ----------------------------------------------------------------------------------------------------
class HFVQA:
    """Visual question answering with a local Hugging Face model (``BlipForQuestionAnswering`` and its processor,
    e.g. a downloaded ``Salesforce/blip-vqa-base``). Needs ``transformers`` (the ``[align]`` extra). TIFA
    questions get their choices appended to the question (as the public DreamSync reconstruction does) and the
    generated answer mapped with :func:`nearest_choice`; DSG questions are answered yes / no."""

    def __init__(self, path, device: Optional[str] = None, max_new_tokens: int = 8, batch_size: int = 32):
        try:
            from transformers import BlipForQuestionAnswering, BlipProcessor
        except Exception as e:  # noqa: BLE001
            raise ImportError("HFVQA needs transformers: pip install 'dream[align]'") from e
        self.device = torch.device(device or "cpu")
        self.processor = BlipProcessor.from_pretrained(path, local_files_only=True)
        self.model = BlipForQuestionAnswering.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)

    @torch.no_grad()
    def ask(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        """Free-form answers, one per (image, question) pair; images (N, 3, H, W) in [-1, 1] or uint8."""
        x = images if images.dtype == torch.uint8 else ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out = []
        for i in range(0, len(questions), self.batch_size):
            pix = [im.permute(1, 2, 0).cpu().numpy() for im in x[i: i + self.batch_size]]
            enc = self.processor(images=pix, text=list(questions[i: i + self.batch_size]), return_tensors="pt",
                                 padding=True).to(self.device)
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens)
            out += [t.strip().lower() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    def answer(self, images: torch.Tensor, question_sets: Sequence[dict]) -> list[dict]:
        pairs = []                                             # (image index, style, question index, text)
        for i, qa in enumerate(question_sets):
            for q_i, q in enumerate(qa.get("tifa", ())):
                pairs.append((i, "tifa", q_i, f"{q['question']} choices: {', '.join(map(str, q['choices']))}"))
            for q_i, q in enumerate(qa.get("dsg", ())):
                pairs.append((i, "dsg", q_i, q["question"]))
        if not pairs:
            return [{} for _ in question_sets]
        raw = self.ask(images[[p[0] for p in pairs]], [p[3] for p in pairs])
        out = [{k: [None] * len(qa.get(k, ())) for k in ("tifa", "dsg") if qa.get(k)} for qa in question_sets]
        for (i, style, q_i, _), a in zip(pairs, raw):
            q = question_sets[i][style][q_i]
            out[i][style][q_i] = nearest_choice(a, q["choices"]) if style == "tifa" else \
                nearest_choice(a, ["yes", "no"])
        return out


# ----------------------------------------------------------------------------------------------------
# DREAM as its own judge
# ----------------------------------------------------------------------------------------------------
class DreamSelfJudge:
    """S_F = DREAM's probability for the prompt among the prompt and ``num_negatives`` hard negatives of it
    (softmax of the contrastive head's logits, logit scale included). No external model: the generator judges
    its own candidates. ShapesWorld prompts get their negatives from :func:`hard_negative_specs`; other prompts
    need ``negatives(prompt) -> list[str]``."""

    def __init__(self, pipeline, num_negatives: int = 8, negatives=None, shapes_config: Optional[ShapesConfig] = None):
        from dream.data.shapes import ShapesWorld

        self.pipe, self.num_negatives = pipeline, int(num_negatives)
        self.world = ShapesWorld(shapes_config or ShapesConfig())
        self.negatives = negatives

    def _negatives(self, prompt: str) -> list[str]:
        if self.negatives is not None:
            return list(self.negatives(prompt))
        g = torch.Generator().manual_seed(int(hashlib.sha256(prompt.encode()).hexdigest()[:12], 16))
        specs = hard_negative_specs(parse_caption(prompt), self.num_negatives, self.world.config, g)
        return [self.world.prompt_from_spec(s) for s in specs]

    @torch.no_grad()
    def text_logits(self, images: torch.Tensor, texts: Sequence[Sequence[str]]) -> torch.Tensor:
        """logit_scale x cosine of each image with each of its candidate texts: (N, T)."""
        img = self.pipe.encode_images(images)                                    # (N, E) normalised
        flat = [t for ts in texts for t in ts]
        txt = self.pipe.encode_text(flat).view(len(texts), -1, img.shape[-1])    # (N, T, E)
        return self.pipe.model.logit_scale.exp().float() * torch.einsum("ne,nte->nt", img.float(), txt.float())

    def score(self, images: torch.Tensor, prompts: Sequence[str], qa: Sequence[dict] = ()) -> torch.Tensor:
        texts = [[p] + self._negatives(p) for p in prompts]
        width = min(len(t) for t in texts)
        texts = [t[:width] for t in texts]
        return torch.softmax(self.text_logits(images, texts), dim=-1)[:, 0].cpu()


# ----------------------------------------------------------------------------------------------------
# Aesthetics
# ----------------------------------------------------------------------------------------------------
class ShapesAestheticJudge:
    """ShapesWorld render quality in [0, 1]: ``exp(-stray / stray_scale) * clamp((iou - iou_floor) /
    (1 - iou_floor))``, where ``stray`` is the mean squared colour (0..1 units) of pixels away from every detected
    object (noise, smears, ghost objects too small to count) and ``iou`` the area-weighted soft IoU of the objects
    with their best clean shape template (blur, ragged or merged shapes lower it). Clean renders score 1; see
    tests/align for how noise and blur move it. A stand-in for VILA / LAION aesthetics on this synthetic world."""

    def __init__(self, shapes_config: Optional[ShapesConfig] = None, stray_scale: float = 0.002,
                 iou_floor: float = 0.5, dilate: int = 1):
        self.verifier = Verifier(shapes_config or ShapesConfig(), VERIFIER_VARIANTS["evaluation"])
        self.stray_scale, self.iou_floor, self.dilate = float(stray_scale), float(iou_floor), int(dilate)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        x = self.verifier._to_unit(images).cpu()                                  # (N, 3, H, W) in [0, 1]
        N, _, H, W = x.shape
        bg = self.verifier._bg.view(1, 3, 1, 1)
        off = (x - bg).abs().amax(1)                                             # (N, H, W)
        parsed = self.verifier.parse(images)
        out = torch.zeros(N)
        for i, objs in enumerate(parsed):
            keep = torch.zeros(H, W, dtype=torch.bool)
            for o in objs:
                x0, y0, x1, y1 = o["bbox"]
                d = self.dilate
                keep[max(0, y0 - d): y1 + d, max(0, x0 - d): x1 + d] = True
            stray = float((off[i][~keep] ** 2).mean()) if bool((~keep).any()) else 0.0
            if objs:
                area = torch.tensor([float(o["area"]) for o in objs])
                iou = float((torch.tensor([o["shape_iou"] for o in objs]) * area).sum() / area.sum())
            else:
                iou = 0.0
            q = min(1.0, max(0.0, (iou - self.iou_floor) / (1.0 - self.iou_floor)))
            out[i] = math.exp(-stray / self.stray_scale) * q
        return out


class LaionAestheticJudge:
    """The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): an MLP over the L2-normalised
    CLIP ViT-L/14 image embedding giving a 1..10 rating, mapped to [0, 1] as ``rating / 10``. Both parts come from
    local files: a Hugging Face ``CLIPModel`` folder and the MLP's state dict (``layers.{0,2,4,6,7}``: 768 -> 1024 ->
    128 -> 64 -> 16 -> 1, dropout between the first ones) as .safetensors (or a ``.pth`` read with
    ``weights_only=True``)."""

    def __init__(self, clip_path, mlp_path, device: Optional[str] = None):
        try:
            from transformers import CLIPImageProcessor, CLIPModel
        except Exception as e:  # noqa: BLE001
            raise ImportError("LaionAestheticJudge needs transformers: pip install 'dream[align]'") from e
        self.device = torch.device(device or "cpu")
        self.clip = CLIPModel.from_pretrained(clip_path, local_files_only=True).to(self.device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(clip_path, local_files_only=True)
        dim = self.clip.config.projection_dim
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
        mlp_path = str(mlp_path)
        if mlp_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(mlp_path)
        else:
            state = torch.load(mlp_path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        self.mlp.load_state_dict(state, strict=True)
        self.mlp = self.mlp.to(self.device).eval()

    @torch.no_grad()
    def rating(self, images: torch.Tensor) -> torch.Tensor:
        """The predictor's 1..10 rating per image."""
        x = images if images.dtype == torch.uint8 else ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        enc = self.processor(images=[im.permute(1, 2, 0).cpu().numpy() for im in x], return_tensors="pt")
        feats = self.clip.get_image_features(pixel_values=enc["pixel_values"].to(self.device))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return self.mlp(feats).squeeze(-1).cpu()

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return (self.rating(images) / 10.0).clamp(0.0, 1.0)
